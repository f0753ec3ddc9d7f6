"""The from-scratch race's training step: a small byte-level GPT against its iso-FLOP MoE twin (issue 28).

Both are the race's twins (`contest/race.race_twins`), trained from random weights as the race trains them: vocabulary 256 (bytes),
4 layers, d=256, 4 heads, context 128, batch 32. The dense twin's MLP has hidden size 4d; the MoE twin has E=8
experts of hidden 4d/k with top-k=2 in every layer, so a token's MLP arithmetic is the same (the script computes
both models' FLOPs per token and prints them). Each step is the trainer's (`training/steps.training_step`:
forward, loss with the router losses, backward, clipping folded into fused AdamW), timed in interleaved rounds,
fp32 and bf16 autocast, each round on a new batch (so the routing, and with it each expert's row count, changes
from step to step as it does in training). The batches are random bytes unless `--trained-steps N`: then they are
the race's own corpus, and both twins first train N steps on it (the race's optimizer and schedule, bf16), so the timed
steps route as the race's later steps do: an untrained router sends most bytes to a few experts (a few large
products, cheaper than the ~1,000-row products balanced routing gives). `--wide` doubles the width (d=512).
`--exact-rows` adds a third contender: the MoE with its expert products over exactly each expert's rows instead of
row blocks (`expert_products.ROW_BLOCK` says why blocks). `--profile` prints where the MoE step's time goes
(torch.profiler, CPU time by operator).

    python benchmarks/bench_race_step.py [--wide] [--rounds 15] [--trained-steps 150] [--exact-rows] [--profile]
                                         [--quick]

Issue 28's target: a MoE step <= 1.10x a dense step, in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# First, as the command line does (cli/main.py), before torch is imported: the race runs through it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table  # noqa: E402, I001

import torch  # noqa: E402
from flash_experts.contest.race import RaceSettings, build_corpus, race_optimizer, race_twins  # noqa: E402
from flash_experts.training.optimizer import set_scheduled_lr  # noqa: E402
from flash_experts.training.steps import training_step  # noqa: E402

TARGET = 1.10
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_seconds(steps: dict, batches: list[torch.Tensor]) -> dict[str, float]:
    """Median seconds per step of each contender, timed in interleaved rounds (one batch per round, the same for
    every contender) after two warm-up steps each."""
    for step in steps.values():
        step(batches[0]), step(batches[1])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for ids in batches:
        for name, step in steps.items():
            start = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def trained_batches(models: dict, settings: RaceSettings, args: argparse.Namespace) -> tuple[list[torch.Tensor], str]:
    """Train every contender `args.trained_steps` steps on the race's corpus (the race's optimizer and schedule,
    bf16 autocast, as the race trains), then return the corpus's next `args.rounds` batches and a line on
    how balanced the MoE's routing is on them (the busiest expert's share of a layer's assignments, 1/E when
    perfectly balanced)."""
    import tempfile

    from flash_experts.model.routing import recording_routers

    with tempfile.TemporaryDirectory() as folder:
        corpus = build_corpus(Path(folder), args.quick)
    for model in models.values():
        optimizer = race_optimizer(model, settings)
        step = training_step(model, optimizer, torch.bfloat16)
        for i in range(args.trained_steps):
            set_scheduled_lr(optimizer, i, settings.optim())
            step(corpus.train_batch(i, args.batch, args.context, settings.seed))
    batches = [corpus.train_batch(args.trained_steps + i, args.batch, args.context, settings.seed)
               for i in range(args.rounds)]
    with torch.no_grad(), recording_routers(models["MoE"]) as seen:
        models["MoE"](batches[0])
    busiest = [float(torch.bincount(experts_TK.reshape(-1), minlength=args.experts).max() / experts_TK.numel())
               for experts_TK, _, _ in seen.values()]
    return batches, (f"routers trained {args.trained_steps} steps on the race's corpus; busiest expert's share per "
                     f"layer {', '.join(f'{b:.2f}' for b in busiest)} (1/E = {1 / args.experts:.2f})")


def profile(step, ids: torch.Tensor, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(ids)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wide", action="store_true", help="d=512 (twice the race's width)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed steps per contender (median)")
    parser.add_argument("--exact-rows", action="store_true",
                        help="also the MoE with its expert products over exact row counts (no row blocks)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--profile", action="store_true", help="print the MoE step's operators by CPU time")
    parser.add_argument("--trained-steps", type=int, default=0,
                        help="train both twins this many steps on the race's corpus first, and time on its batches")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two rounds: a smoke run")
    args = parser.parse_args()
    width, heads = (512, 8) if args.wide else (256, 4)
    if args.quick:
        width, heads, args.layers, args.context, args.batch, args.rounds = 64, 2, 2, 32, 4, 2

    settings = RaceSettings(width=width, layers=args.layers, heads=heads, context=args.context, batch_size=args.batch,
                            num_experts=args.experts, num_experts_per_tok=args.top_k, seed=0)
    twins = race_twins(settings)
    models = {"dense": twins["dense"].train(), "MoE": twins["moe"].train()}
    if args.exact_rows:
        models["MoE, exact rows"] = race_twins(settings)["moe"].train()
        for block in models["MoE, exact rows"].transformer.h:
            block.mlp.experts.row_blocks = False
    flops = {name: model.flops_per_token(args.context) for name, model in models.items()}
    if args.trained_steps:
        batches, balance = trained_batches(models, settings, args)
    else:
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 256, (args.batch, args.context), generator=generator) for _ in range(args.rounds)]
        balance = "untrained routers, random bytes"
    # the trainer's AdamW: fused (one pass over the parameters; the MoE has several times the dense parameters)
    steps = {(name, precision): training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), dtype)
             for precision, dtype in PRECISIONS.items() if precision in args.precisions
             for name, model in models.items()}
    seconds = step_seconds(steps, batches)

    print(f"## The race's training step: dense vs its iso-FLOP MoE twin, d={width}, {args.layers} layers, context "
          f"{args.context}, batch {args.batch}\n")
    print(f"- machine: {machine_description()}")
    print(f"- MoE: {args.experts} experts of hidden {settings.expert_hidden}, top-{args.top_k}, every "
          f"layer; dense: hidden {models['dense'].config.intermediate_size}. Forward matmul FLOPs per token: dense "
          f"{flops['dense'] / 1e6:.2f}M, MoE {flops['MoE'] / 1e6:.2f}M ({flops['MoE'] / flops['dense']:.3f}x); "
          f"parameters: dense {sum(p.numel() for p in models['dense'].parameters()) / 1e6:.2f}M, MoE "
          f"{sum(p.numel() for p in models['MoE'].parameters()) / 1e6:.2f}M")
    print(f"- median of {args.rounds} interleaved steps after two warm-up steps each; routing: {balance}\n")
    rows, verdicts = [], []
    tokens = args.batch * args.context
    for precision in args.precisions:
        dense, moe = seconds[("dense", precision)], seconds[("MoE", precision)]
        for name in models:
            value = seconds[(name, precision)]
            rows.append([precision, name, f"{value * 1e3:,.0f}", f"{tokens / value:,.0f}", f"{value / dense:.3f}x"])
        verdicts.append(f"Target: MoE step <= {TARGET:.2f}x the dense step ({precision}): {moe / dense:.3f}x, "
                        f"{'met' if moe / dense <= TARGET else 'NOT met'}")
    print(markdown_table(["precision", "model", "step ms", "tokens/s", "step / dense"], rows))
    print()
    print("\n".join(verdicts))
    if args.profile:
        for precision in args.precisions:
            print(f"\n### Where the MoE step's time goes ({precision})\n")
            print(profile(steps[("MoE", precision)], batches[0]))


if __name__ == "__main__":
    main()
