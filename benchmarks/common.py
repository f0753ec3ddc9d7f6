"""Shared benchmark helpers: timing with warm-up, machine description, Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
            f"transformers {transformers.__version__}; triton {triton_version}; python {platform.python_version()}")


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
