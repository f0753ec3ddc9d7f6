"""MoE layer forward+backward: ours vs Hugging Face's MixtralSparseMoeBlock and a dense GPT-2 MLP.

Equal FLOPs: a GPT-2 expert (768 -> 3072 -> 768, two matmuls) costs what a SwiGLU expert of intermediate
size 2048 costs (three matmuls 768 x 2048). 8 experts, top-2, 2048 tokens by default. Every contender gets
the same routing work (its own router) and the same input.

    python benchmarks/bench_moe.py [--tokens 2048] [--dtype fp32|bf16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, time_call  # noqa: E402

from flash_experts.model.moe import MoELayer  # noqa: E402


def ours(d: int, f: int, experts: int, top_k: int) -> torch.nn.Module:
    layer = MoELayer(d, f, experts, top_k, activation=lambda x: F.gelu(x, approximate="tanh"), gated=False,
                     bias=True, layer_index=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer


def hf_mixtral(d: int, f_swiglu: int, experts: int, top_k: int, implementation: str) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d, intermediate_size=f_swiglu, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def dense_mlp(d: int, f: int) -> torch.nn.Module:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(f, GPT2Config(n_embd=d, resid_pdrop=0.0))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.02)
    return mlp


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    def step():
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = module(inp)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    d, f, f_swiglu, experts, top_k, tokens = 768, 3072, 2048, 8, 2, args.tokens
    if args.quick:
        d, f, f_swiglu, tokens = 64, 256, 170, 128
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(1, tokens, d)

    contenders = {"flash-experts MoELayer (GPT-2 experts)": ours(d, f, experts, top_k)}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        contenders[f"HF MixtralSparseMoeBlock [{implementation}]"] = hf_mixtral(d, f_swiglu, experts, top_k,
                                                                                 implementation)
    contenders["dense GPT-2 MLP (HF GPT2MLP)"] = dense_mlp(d, f)

    seconds = {}
    for name, module in contenders.items():
        try:
            seconds[name] = time_call(fwd_bwd(module, x, dtype), repeats=args.repeats)
        except Exception as error:  # an HF option unavailable on this build: report, don't crash
            print(f"skipped {name}: {type(error).__name__}: {error}", file=sys.stderr)
    ours_s = seconds["flash-experts MoELayer (GPT-2 experts)"]
    hf_best = min(v for k, v in seconds.items() if k.startswith("HF"))
    rows = [[name, f"{s * 1e3:.1f}", f"{tokens / s:,.0f}", f"{s / ours_s:.2f}x"] for name, s in seconds.items()]
    print(f"\nMoE layer forward+backward, {tokens} tokens, d={d}, {experts} experts, top-{top_k}, {args.dtype}")
    print(f"machine: {machine_description()}\n")
    print(markdown_table(["layer", "ms", "tokens/s", "time vs ours"], rows))
    print(f"\nours vs HF's fastest option: {hf_best / ours_s:.2f}x faster (target >= 1.5x)")
    dense_s = seconds["dense GPT-2 MLP (HF GPT2MLP)"]
    print(f"ours vs dense MLP: {ours_s / dense_s:.2f}x the dense time (target <= 2.3x, arithmetic floor 2.0x)")


if __name__ == "__main__":
    main()
