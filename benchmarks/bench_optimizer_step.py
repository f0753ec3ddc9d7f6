"""Gradient clipping + the fused AdamW update: torch's `clip_grad_norm_` then `optimizer.step()`, against the
clipping folded into the update (`flash_experts.training.optimizer.clipped_step`), on the parameters of the
dense GPT-2 small and of its upcycled MoE (the models of bench_train_step.py).

    python benchmarks/bench_optimizer_step.py [--experts 8] [--top-k 1] [--rounds 7]

The per-parameter work of a training step (it does not depend on the tokens): the part of the MoE's step
that grows with its total parameters rather than its active ones. Both ways run interleaved on the same
gradients (fresh copies each round), median over rounds; prints a Markdown table and the ratio per model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import adamw, fresh_models  # noqa: E402
from common import machine_description, markdown_table  # noqa: E402
from flash_experts.training.optimizer import clipped_step, gradient_norm  # noqa: E402


def time_ways(model: torch.nn.Module, rounds: int) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    grads = [1e-3 * torch.randn(p.shape, generator=generator) for p in params]

    def torch_way() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def folded() -> None:
        clipped_step(optimizer, params, gradient_norm(params), 1.0)

    ways = {"clip_grad_norm_ + step": torch_way, "folded (clipped_step)": folded}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_index in range(rounds + 1):  # round 0 warms up (the optimizer state is allocated there)
        for name, way in ways.items():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            start = time.perf_counter()
            way()
            if round_index:
                times[name].append(time.perf_counter() - start)
            optimizer.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks that it runs")
    args = parser.parse_args()
    size = dict(layers=2, embd=64, heads=2, positions=64) if args.quick else dict(layers=12, embd=768, heads=12,
                                                                                  positions=1024)
    dense, moe = fresh_models(**size, experts=args.experts, top_k=args.top_k, seed=0)
    models = {"HF GPT2LMHeadModel dense": dense, f"ours: MoE upcycled ({args.experts} experts, every other layer)": moe}
    rows = []
    for name, model in models.items():
        median = time_ways(model, args.rounds)
        torch_ms, folded_ms = (1e3 * median[k] for k in ("clip_grad_norm_ + step", "folded (clipped_step)"))
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, f"{params / 1e6:.0f}M", f"{torch_ms:,.0f}", f"{folded_ms:,.0f}",
                     f"{folded_ms / torch_ms:.2f}x"])
        print(f"  {name}: {torch_ms:.0f} ms -> {folded_ms:.0f} ms", file=sys.stderr, flush=True)
    print(f"## Gradient clipping + fused AdamW update, median of {args.rounds} interleaved rounds\n")
    print(f"- machine: {machine_description()}\n")
    print(markdown_table(["model", "params", "clip_grad_norm_ + step, ms", "folded, ms", "folded / torch's"], rows))


if __name__ == "__main__":
    main()
