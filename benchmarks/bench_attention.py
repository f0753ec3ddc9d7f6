"""Attention benchmark: forward+backward time and peak memory of our flash attention against its peers.

    python benchmarks/bench_attention.py            # seq 128..4096 (8192 on CUDA), batch 1, 12 heads, head_dim 64, causal
    python benchmarks/bench_attention.py --quick    # seq 128 and 256 only: a check that everything runs

Implementations: ours (PyTorch tiled flash, flash_experts.attention.flash), SDPA
(torch.nn.functional.scaled_dot_product_attention, whatever backend torch picks), eager (materialised
softmax). On CUDA also bf16 rows with our Triton kernel and SDPA restricted to its flash backend.

Peak memory is the extra memory a forward+backward needs above what already existed (inputs included):
- CPU: each case runs in a fresh subprocess and reports the growth of its peak resident set size
  (ru_maxrss) over one forward+backward, measured after a tiny warm-up so allocator and thread pools
  already exist. It counts everything the process touched, not only torch tensors.
- CUDA: torch.cuda.max_memory_allocated over one forward+backward, minus what was allocated before.
FLOPs follow the FlashAttention-2 convention: forward 4*B*H*T*T*D (halved when causal), backward 2.5x that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakCUDA  # noqa: E402

BATCH, HEADS, HEAD_DIM = 1, 12, 64
FULL_SEQS = [128, 256, 512, 1024, 2048, 4096]
GPU_SEQS = FULL_SEQS + [8192]  # the GPU target covers 1024..8192
QUICK_SEQS = [128, 256]


# ---------------------------------------------------------------------------------------------------------
# The implementations, all (q, k, v) -> out on (batch, heads, seq, head_dim), causal.

def eager(q, k, v):
    """Materialised softmax (the project's textbook reference): the (T, T) matrices live in memory."""
    from flash_experts.attention.contract import eager_attention

    return eager_attention(q, k, v, causal=True)


def sdpa_attention(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_flash_attention(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def our_flash_attention(q, k, v):
    from flash_experts.attention.flash import flash_attention

    return flash_attention(q, k, v, causal=True)


def triton_attention(q, k, v):
    from flash_experts.attention.flash_triton import triton_flash_attention

    return triton_flash_attention(q, k, v, causal=True)


IMPLEMENTATIONS = {
    "ours": our_flash_attention,
    "triton": triton_attention,
    "sdpa": sdpa_attention,
    "sdpa-flash": sdpa_flash_attention,
    "eager": eager,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def attention_flops(seq: int) -> float:
    forward = 4 * BATCH * HEADS * seq * seq * HEAD_DIM / 2  # two matmuls, causal halves the work
    return forward * 3.5  # backward = 2.5 x forward


# ---------------------------------------------------------------------------------------------------------
# Measuring one case.

def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(impl: str, seq: int, dtype_name: str, device: str, min_seconds: float, max_repeats: int) -> dict:
    """Peak extra memory of the first forward+backward, then the best time of the following ones.

    Best-of rather than median: on a shared machine the minimum is the run least disturbed by others.
    """
    fn = IMPLEMENTATIONS[impl]
    dtype = DTYPES[dtype_name]

    def make_inputs(length):
        gen = torch.Generator(device=device).manual_seed(0)
        make = lambda: torch.randn(BATCH, HEADS, length, HEAD_DIM, device=device, dtype=dtype,
                                   generator=gen).requires_grad_()
        q, k, v = make(), make(), make()
        return q, k, v, torch.randn(q.shape, device=device, dtype=dtype, generator=gen)

    def forward_backward(q, k, v, grad_out):
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    forward_backward(*make_inputs(64))  # warm-up: kernels compiled, allocator and thread pool up
    inputs = make_inputs(seq)
    _sync(device)
    if device == "cuda":
        with PeakCUDA() as tracker:
            grads = forward_backward(*inputs)
        peak = tracker.peak_bytes
    else:
        before = _max_rss_bytes()
        grads = forward_backward(*inputs)
        peak = _max_rss_bytes() - before
    del grads

    times = []
    # At least one timed run; more until min_seconds have passed (slow cases on a busy CPU stop early).
    while len(times) < max_repeats and (not times or sum(times) < min_seconds):
        _sync(device)
        start = time.perf_counter()
        forward_backward(*inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"impl": impl, "seq": seq, "dtype": dtype_name, "device": device,
            "time_s": min(times), "repeats": len(times), "peak_bytes": peak}


def measure_in_subprocess(impl, seq, dtype_name, device, min_seconds, max_repeats) -> dict:
    """A fresh process per case, so that ru_maxrss (a high-water mark) belongs to this case alone."""
    command = [sys.executable, __file__, "--worker", impl, str(seq), dtype_name, device,
               "--min-seconds", str(min_seconds), "--max-repeats", str(max_repeats)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return {"impl": impl, "seq": seq, "dtype": dtype_name, "device": device,
                "error": lines[-1] if lines else f"exit code {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_safely(impl, seq, dtype_name, device, min_seconds, max_repeats) -> dict:
    try:
        return measure(impl, seq, dtype_name, device, min_seconds, max_repeats)
    except Exception as error:  # one failing peer (OOM, unsupported backend) must not end the run
        if device == "cuda":
            torch.cuda.empty_cache()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {"impl": impl, "seq": seq, "dtype": dtype_name, "device": device, "error": message}


# ---------------------------------------------------------------------------------------------------------
# Report.

def machine_info(device: str) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"- CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
             f"- torch {torch.__version__}, Python {platform.python_version()}, device: {device}",
             # Other processes on the machine slow every timing down; the load average makes that visible.
             "- load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
        try:
            import triton

            lines[-1] += f", triton {triton.__version__}"
        except ImportError:
            pass
    return lines


def markdown_table(results: list[dict]) -> str:
    """One row per case; the ratio columns compare ours with each peer at the same seq and dtype."""
    ours = {(r["seq"], r["dtype"]): r for r in results if r["impl"] == "ours" and "error" not in r}
    rows = ["| seq | dtype | implementation | fwd+bwd ms | runs | TFLOP/s | peak MiB | ours time / this | "
            "ours peak / this |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        head = f"| {r['seq']} | {r['dtype']} | {r['impl']} |"
        if "error" in r:
            rows.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        mine = ours.get((r["seq"], r["dtype"])) if r["impl"] != "ours" else None
        time_ratio = f"{mine['time_s'] / r['time_s']:.2f}" if mine else "-"
        peak_ratio = f"{mine['peak_bytes'] / r['peak_bytes']:.3f}" if mine and r["peak_bytes"] > 0 else "-"
        rows.append(f"{head} {r['time_s'] * 1e3:.1f} | {r['repeats']} | {attention_flops(r['seq']) / r['time_s'] / 1e12:.3f} | "
                    f"{r['peak_bytes'] / 2**20:.1f} | {time_ratio} | {peak_ratio} |")
    return "\n".join(rows)


def triton_target_line(results: list[dict]) -> str:
    """The GPU target: our Triton kernel's fwd+bwd >= 0.8x the speed of SDPA's flash backend, bf16, seq 1024..8192."""
    by_key = {(r["impl"], r["seq"], r["dtype"]): r for r in results if "error" not in r}
    ratios = {}
    for seq in sorted({r["seq"] for r in results if 1024 <= r["seq"] <= 8192}):
        triton, flash = by_key.get(("triton", seq, "bf16")), by_key.get(("sdpa-flash", seq, "bf16"))
        if triton and flash:
            ratios[seq] = flash["time_s"] / triton["time_s"]  # speed of ours relative to SDPA's flash backend
    if not ratios:
        return ""
    verdict = "met" if min(ratios.values()) >= 0.8 and max(ratios) >= 8192 and min(ratios) <= 1024 else "NOT met"
    listed = ", ".join(f"{seq}: {ratio:.2f}x" for seq, ratio in ratios.items())
    return f"GPU target, Triton speed / SDPA flash speed (bf16, target >= 0.8x at seq 1024..8192): {listed}; {verdict}"


def memory_target_line(results: list[dict]) -> str:
    """The issue's target: our peak memory at sequence 4096 <= 1/4 of eager attention's."""
    by_key = {(r["impl"], r["seq"], r["dtype"]): r for r in results if "error" not in r}
    seq = 4096
    ours, eager = by_key.get(("ours", seq, "fp32")), by_key.get(("eager", seq, "fp32"))
    if not ours or not eager:
        return f"Memory target (ours <= 1/4 of eager at seq {seq}, fp32): not measured in this run."
    ratio = ours["peak_bytes"] / eager["peak_bytes"]
    verdict = "met" if ratio <= 0.25 else "NOT met"
    return f"Memory target at seq {seq} (fp32): ours / eager peak = {ratio:.3f} (target <= 0.25): {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seq 128 and 256 only, fewer repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 128..4096, on CUDA ..8192)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each case at least this long")
    parser.add_argument("--max-repeats", type=int, default=10)
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "SEQ", "DTYPE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        impl, seq, dtype_name, device = args.worker
        print(json.dumps(measure(impl, int(seq), dtype_name, device, args.min_seconds, args.max_repeats)))
        return

    seqs = args.seqs or (QUICK_SEQS if args.quick else GPU_SEQS if args.device == "cuda" else FULL_SEQS)
    min_seconds, max_repeats = (0.2, 3) if args.quick else (args.min_seconds, args.max_repeats)
    cases = [("fp32", impl) for impl in ("ours", "sdpa", "eager")]
    notes = []
    if args.device == "cuda":
        cases += [("bf16", impl) for impl in ("ours", "triton", "sdpa-flash", "sdpa", "eager")]
        try:
            from flash_experts.attention.flash_triton import triton_flash_attention  # noqa: F401
        except Exception as error:  # written by another engineer; the table stays useful without it
            cases.remove(("bf16", "triton"))
            notes.append(f"Triton kernel skipped: cannot import flash_experts.attention.flash_triton ({error})")

    # Grouped by dtype, then sequence length, so peers sit next to each other in the table.
    ordered = [(dtype_name, seq, impl) for dtype_name in ("fp32", "bf16") for seq in seqs
               for case_dtype, impl in cases if case_dtype == dtype_name]
    run = measure_in_subprocess if args.device == "cpu" else measure_safely
    results = []
    for dtype_name, seq, impl in ordered:
        result = run(impl, seq, dtype_name, args.device, min_seconds, max_repeats)
        results.append(result)
        status = result.get("error") or f"{result['time_s'] * 1e3:.1f} ms, {result['peak_bytes'] / 2**20:.1f} MiB"
        print(f"  {args.device} {dtype_name} {impl:10s} seq {seq:5d}: {status}", file=sys.stderr, flush=True)

    print(f"## Attention forward+backward (batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, causal)\n")
    print("\n".join(machine_info(args.device)) + "\n")
    print(markdown_table(results))
    print("\nfwd+bwd ms: best of `runs` timed runs after one untimed run. Peak MiB: extra memory of one forward+backward above the inputs "
          + ("(growth of ru_maxrss in a fresh process)." if args.device == "cpu"
             else "(torch.cuda.max_memory_allocated).")
          + " Ratios < 1 mean ours is faster / smaller.")
    for line in [memory_target_line(results), triton_target_line(results), *notes]:
        if line:
            print(f"\n{line}")


if __name__ == "__main__":
    main()
