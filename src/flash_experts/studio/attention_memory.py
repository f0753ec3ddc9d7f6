"""Peak memory of one attention forward, ours (flash) against eager, measured live at the page's length.

On CPU torch keeps no allocation statistics, so each implementation runs in a fresh process and reports how
much its peak resident set size grew over the forward (after a tiny warm-up, so thread pools and the
allocator already exist). Linux lets a process reset its peak to its current size (`/proc/self/clear_refs`,
then `VmHWM` in `/proc/self/status`), so the imports' own peak does not hide a smaller one. On CUDA it is
`torch.cuda.max_memory_allocated` above what was allocated before.
"""

from __future__ import annotations

import json
import subprocess
import sys

_MEASURE = r"""
import json, sys, torch
from flash_experts.attention import attention
heads, length, head_dim, implementation, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.manual_seed(0)
q, k, v = (torch.randn(1, heads, length, head_dim, device=device) for _ in range(3))
with torch.inference_mode():
    attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], causal=True, implementation=implementation)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        attention(q, k, v, causal=True, implementation=implementation); torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    elif not __import__("os").path.exists("/proc/self/clear_refs"):  # not Linux: the peak since start
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        attention(q, k, v, causal=True, implementation=implementation)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    else:
        def kib(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak RSS (VmHWM) := the current RSS
        before = kib("VmRSS:")
        attention(q, k, v, causal=True, implementation=implementation)
        peak = (kib("VmHWM:") - before) * 1024
print(json.dumps({"peak_bytes": peak}))
"""


def measure_attention_memory(heads: int, length: int, head_dim: int, device: str = "cpu") -> dict:
    """{"flash": bytes, "eager": bytes, ...}: the extra peak memory of one causal fp32 attention forward of
    shape (1, heads, length, head_dim) with our flash attention and with eager attention."""
    result = {"heads": heads, "length": length, "head_dim": head_dim, "device": device,
              "method": "peak RSS growth of a fresh process (VmHWM after clear_refs)" if device == "cpu"
              else "torch.cuda.max_memory_allocated"}
    for implementation in ("flash", "eager"):
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(heads), str(length), str(head_dim), implementation,
                              device], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"measuring {implementation} attention failed: {run.stderr.strip()[-300:]}")
        result[implementation] = json.loads(run.stdout.strip().splitlines()[-1])["peak_bytes"]
    return result
