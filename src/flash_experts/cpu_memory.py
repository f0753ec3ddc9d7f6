"""How this process takes memory and cores from the operating system on CPU: set once, before any training.

Training on CPU allocates and frees the same large tensors (activations, their gradients) every step. Two
settings keep that memory from going back to the kernel between steps, because memory fresh from the kernel
page-faults on first write, once per page, which costs more than the write:
- transparent huge pages for PyTorch's large tensors (THP_MEM_ALLOC_ENABLE=1, read by torch once, before its
  first large allocation): one fault per 2 MiB instead of per 4 KiB;
- glibc's malloc told to keep freed memory for reuse: blocks up to 32 MiB come from its heap rather than
  fresh mappings (its default threshold starts at 128 KiB and only grows as large blocks are freed), and up
  to 1 GiB of free heap stays mapped instead of being handed back. The cost is memory the process keeps
  after a peak (its resident size does not shrink back).
benchmarks/bench_race_step.py and BENCHMARKS.md measure both. A user who sets THP_MEM_ALLOC_ENABLE, or any of
glibc's own MALLOC_*_ / GLIBC_TUNABLES variables, keeps their setting.

And cores (`share_cores_while_waiting`): PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the
pip wheels) whose threads, waiting at the end of each parallel region, spin for a while before they sleep. On a
machine running something else (a laptop's browser, a second training job) the spinning thread holds a core
the thread it waits for needs, and every step pays in scheduler time slices: a training step beside one
competing 2-thread process took 3.1-4.9x its time alone, and 1.7-1.9x with waiting threads that sleep at once
(OMP_WAIT_POLICY=PASSIVE), which cost nothing measurable alone (benchmarks/bench_busy_machine.py, BENCHMARKS.md).
The contests' figures never depend on this (their budget is FLOPs); their wall time does.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20


def keep_cpu_memory_between_steps() -> bool:
    """Apply both settings above; True when glibc's malloc took them (False elsewhere: macOS, musl, or a
    user's own malloc settings, which win). Call before torch is imported, for the huge pages to apply."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ or any(
            name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES)))


def share_cores_while_waiting() -> bool:
    """Tell OpenMP's waiting threads to sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the user set
    OMP_WAIT_POLICY or GOMP_SPINCOUNT (theirs win). libgomp reads it when torch loads it: call before importing
    torch. True when this call set it."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
