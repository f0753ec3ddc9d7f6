"""Shared benchmark helpers: timing with warm-up, machine description, Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

# As the command line does (cli/main.py), before torch loads, so that the figures are those of what the trainer
# runs: huge pages and malloc's reuse, and OpenMP's waiting threads that sleep (flash_experts/cpu_memory.py). The
# environment still overrides each.
from flash_experts.cpu_memory import keep_cpu_memory_between_steps, share_cores_while_waiting

KEEPS_MEMORY = keep_cpu_memory_between_steps()
share_cores_while_waiting()

import torch  # noqa: E402

# One home for side-by-side timing: the library's (the demo's equal-compute plan uses it too).
from flash_experts.training.steps import interleaved_medians, sync  # noqa: E402, F401


def time_call(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_description(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        hardware = _cpu_model()
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return (f"{hardware}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"transformers {transformers.__version__}; triton {triton_version}; python {platform.python_version()}; "
            # Other processes slow every timing down; the load average makes that visible.
            f"load average {os.getloadavg()[0]:.1f}"
            # PyTorch's CPU allocator backs large tensors with transparent huge pages when this is 1 (fewer page
            # faults on fresh activations and gradients); it applies to every contender of the process alike.
            f"; THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
            f"; malloc keeps freed memory: {'yes' if KEEPS_MEMORY else 'no'}")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


class PeakRSS:
    """Growth of this process's resident set size at its peak during a `with` block (Linux).

    The kernel's high-water mark (VmHWM) is reset to the current RSS on entry (/proc/self/clear_refs),
    so what model building or imports touched earlier does not hide the block's own peak. (Where the reset
    is not allowed, an earlier, higher peak would be counted: the figure is then an upper bound.)
    """

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            pass
        self.before_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_bytes = max(0, _status_kib("VmHWM") - self.before_kib) * 1024


class PeakCUDA:
    """Growth of the CUDA allocator's peak during a `with` block, above what was allocated on entry
    (torch.cuda.max_memory_allocated; the peak counter is reset on entry, the device synchronised at both ends)."""

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.before


def peak_memory(device: str) -> PeakRSS | PeakCUDA:
    """The peak-memory tracker for `device`: the CUDA allocator's peak, or this process's peak RSS."""
    return PeakCUDA() if device.startswith("cuda") else PeakRSS()


def run_worker(script: str, worker_args: list[str]) -> dict:
    """Run `python script --worker ARGS...` in a fresh process and return the JSON dict on its last line.

    Peak memory on CPU is measured this way: ru_maxrss is a process-wide high-water mark, so each case
    needs a process of its own. A failure (e.g. an out-of-memory peer) comes back as {"error": message}.
    """
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, script, "--worker", *worker_args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return {"error": lines[-1][:120] if lines else f"exit code {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:,.0f}"
