"""MoE layer forward+backward: ours vs Hugging Face's MixtralSparseMoeBlock and a dense GPT-2 MLP.

Equal FLOPs: a GPT-2 expert (768 -> 3072 -> 768, two matmuls) costs what a SwiGLU expert of intermediate
size 2048 costs (three matmuls 768 x 2048). 8 experts, top-2, 2048 tokens by default. Every contender gets
the same routing work (its own router) and the same input.

    python benchmarks/bench_moe.py [--tokens 2048] [--dtype fp32|bf16] [--experts 8] [--top-k 2] [--repeats 5]
                                   [--quick] [--device cuda]

Issue 11's targets: top-1 over 8 experts <= 1.15x the dense MLP, top-2 <= 2.15x (`--top-k 1`, `--top-k 2`).

On CUDA (`--device cuda`; bf16 there takes `torch._grouped_mm`'s fused kernel on Hopper) peak memory is
torch.cuda.max_memory_allocated over one forward+backward, measured in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_description, markdown_table, mib, peak_memory, run_worker  # noqa: E402
from flash_experts.model.moe import MoELayer, MoESettings  # noqa: E402


def ours(d: int, f: int, experts: int, top_k: int) -> torch.nn.Module:
    layer = MoELayer(MoESettings(num_experts=experts, num_experts_per_tok=top_k), hidden_size=d, ffn_size=f,
                     activation=lambda x: F.gelu(x, approximate="tanh"), gated=False, bias=True, layer_index=0)
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


def dense_mlp(d: int, f: int, fused_gelu: bool) -> torch.nn.Module:
    """HF's GPT2MLP. `fused_gelu`: with the same one-kernel tanh GELU as ours (the like-for-like baseline);
    else HF's default "gelu_new", written as five elementwise ops in Python."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    activation = "gelu_pytorch_tanh" if fused_gelu else "gelu_new"
    mlp = GPT2MLP(f, GPT2Config(n_embd=d, resid_pdrop=0.0, activation_function=activation))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.02)
    return mlp


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    def step():
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = module(inp)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
    return step


OURS = "flash-experts MoELayer (GPT-2 experts)"
# Our layer with its other grouped product, for comparison: on CPU "auto" picks the per-expert loop.
OURS_GROUPED_MM = "flash-experts MoELayer, torch._grouped_mm dispatch"
DENSE = "dense GPT-2 MLP (same fused GELU as ours)"
HF_DENSE = "HF GPT2MLP (its default gelu_new)"
HF_OPTIONS = ("eager", "batched_mm", "grouped_mm")


def build(name: str, d: int, f: int, f_swiglu: int, experts: int, top_k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == OURS:
        return ours(d, f, experts, top_k)
    if name == OURS_GROUPED_MM:
        layer = ours(d, f, experts, top_k)
        layer.experts.backend = "grouped_mm"
        return layer
    if name == DENSE:
        return dense_mlp(d, f, fused_gelu=True)
    if name == HF_DENSE:
        return dense_mlp(d, f, fused_gelu=False)
    implementation = name.split("[")[1].rstrip("]")
    return hf_mixtral(d, f_swiglu, experts, top_k, implementation)


def contender_names() -> list[str]:
    return [OURS, OURS_GROUPED_MM, *(f"HF MixtralSparseMoeBlock [{i}]" for i in HF_OPTIONS), DENSE, HF_DENSE]


def sizes(quick: bool, tokens: int, experts: int = 8, top_k: int = 2) -> tuple[int, int, int, int, int, int]:
    """(d, f, f_swiglu, experts, top_k, tokens)"""
    return (64, 256, 168, experts, top_k, 128) if quick else (768, 3072, 2048, experts, top_k, tokens)


def memory_worker(name: str, quick: bool, tokens: int, dtype_name: str, device: str = "cpu", experts: int = 8,
                  top_k: int = 2) -> dict:
    """Growth of peak memory over one forward+backward (after a small warm-up): peak RSS in this fresh
    process on CPU, torch.cuda.max_memory_allocated on CUDA."""
    d, f, f_swiglu, experts, top_k, tokens = sizes(quick, tokens, experts, top_k)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    module = build(name, d, f, f_swiglu, experts, top_k).to(device)
    fwd_bwd(module, torch.randn(1, 16, d, device=device), dtype)()  # allocator, thread pool, kernels
    step = fwd_bwd(module, torch.randn(1, tokens, d, device=device), dtype)
    with peak_memory(device) as peak:
        step()
    return {"peak_bytes": peak.peak_bytes}


def cuda_memory(name: str, args) -> dict:
    """memory_worker in this process (CUDA peaks are per allocator, not per process), errors as a result."""
    try:
        return memory_worker(name, args.quick, args.tokens, args.dtype, "cuda", args.experts, args.top_k)
    except Exception as error:  # noqa: BLE001 - e.g. batched_mm running out of memory: reported, not fatal
        return {"error": f"{type(error).__name__}: {error}"[:120]}
    finally:
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.quick, args.tokens, args.dtype, "cpu", args.experts,
                                       args.top_k)))
        return
    d, f, f_swiglu, experts, top_k, tokens = sizes(args.quick, args.tokens, args.experts, args.top_k)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    # Peak memory first, each contender in a fresh process; one that cannot run at all (HF's batched_mm
    # materialises a weight matrix per token: 2048 x 2 x 768 x 2048 floats) is reported and left out.
    worker_flags = ["--tokens", str(args.tokens), "--dtype", args.dtype, "--experts", str(experts),
                    "--top-k", str(top_k)] + (["--quick"] if args.quick else [])
    memory, failed = {}, {}
    for name in contender_names():
        result = cuda_memory(name, args) if args.device == "cuda" else run_worker(__file__, [name, *worker_flags])
        if "error" in result:
            failed[name] = result["error"]
            print(f"skipped {name}: {result['error']}", file=sys.stderr)
        else:
            memory[name] = result["peak_bytes"]

    torch.manual_seed(0)
    x = torch.randn(1, tokens, d, device=args.device)
    calls = {name: fwd_bwd(build(name, d, f, f_swiglu, experts, top_k).to(args.device), x, dtype)
             for name in contender_names() if name not in failed}
    seconds = interleaved_medians(calls, rounds=args.repeats, device=args.device)
    ours_s = seconds[OURS]
    hf_best_name = min((n for n in seconds if n.startswith("HF Mixtral")), key=seconds.get)
    rows = [[name, f"{s * 1e3:.0f}", f"{tokens / s:,.0f}", mib(memory.get(name)), f"{s / ours_s:.2f}x"]
            for name, s in seconds.items()]
    rows += [[name, "failed", "", "", error] for name, error in failed.items()]
    print(f"## MoE layer forward+backward: {tokens} tokens, d={d}, {experts} experts, top-{top_k}, {args.dtype}\n")
    print(f"- machine: {machine_description(args.device)}")
    peak = ("growth of peak RSS over one forward+backward, each contender in a fresh process" if args.device == "cpu"
            else "torch.cuda.max_memory_allocated over one forward+backward")
    print(f"- HF experts: SwiGLU, intermediate_size={f_swiglu} (the FLOPs of a GPT-2 expert of {f}); "
          f"median of {args.repeats} interleaved rounds; peak MiB = {peak}\n")
    print(markdown_table(["layer", "fwd+bwd ms", "tokens/s", "peak MiB", "time / ours"], rows))
    speedup = seconds[hf_best_name] / ours_s
    print(f"\nTarget: ours >= 1.5x faster than HF's fastest option ({hf_best_name}): {speedup:.2f}x, "
          f"{'met' if speedup >= 1.5 else 'NOT met'}")
    dense_ratio = ours_s / seconds[DENSE]
    # The arithmetic: top-k experts per token do k dense MLPs' FLOPs; the router and the dispatch may add 15%.
    allowed = top_k + 0.15
    print(f"Target: ours <= {allowed:.2f}x the dense MLP's time (top-{top_k}: {top_k}x the FLOPs): "
          f"{dense_ratio:.2f}x, {'met' if dense_ratio <= allowed else 'NOT met'}")

if __name__ == "__main__":
    main()
