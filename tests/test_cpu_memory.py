"""cpu_memory: keep_cpu_memory_between_steps against glibc's own accounting of where a block came from, and
share_cores_while_waiting against libgomp's own report of its settings.

Reference: glibc's mallinfo2() counters (hblkhd: bytes in blocks mapped fresh from the kernel; fordblks: free
bytes the heap keeps). Each case runs in a fresh interpreter, so the settings never leak into this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")

PROBE = textwrap.dedent("""
    import ctypes, json, sys
    from flash_experts.cpu_memory import keep_cpu_memory_between_steps

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        print(json.dumps(None)); sys.exit()
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    kept = keep_cpu_memory_between_steps() if sys.argv[1] == "keep" else None
    size = 16 << 20  # a training step's activation: 4,096 x 1,024 fp32
    mapped_before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped_fresh = libc.mallinfo2().hblkhd - mapped_before
    libc.free(block)
    print(json.dumps({"kept": kept, "mapped_fresh": mapped_fresh, "heap_free_after": libc.mallinfo2().fordblks}))
""")


def probe(mode: str, **env: str) -> dict | None:
    import json

    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            env={**environment, **env})
    return json.loads(result.stdout)


def test_a_freed_training_sized_block_stays_in_the_heap():
    default, kept = probe("default"), probe("keep")
    if default is None:
        pytest.skip("this C library has no mallinfo2 (not glibc >= 2.33)")
    # glibc's default: a 16 MiB block is a fresh mapping (page faults on first write), returned to the kernel on free
    assert default["mapped_fresh"] >= 16 << 20
    assert kept["kept"] is True
    # kept: the block comes from the heap, and after free the heap still holds it for the next step
    assert kept["mapped_fresh"] == 0
    assert kept["heap_free_after"] >= 16 << 20


def test_a_users_own_malloc_settings_win():
    assert probe("keep", MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert probe("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0")["kept"] is False


# The command line itself, in a verb that loads torch before it fails (no model there): the process as users
# start it (`import flash_experts.cli.main` from another program is that program's process, not the command line's;
# the package root registers the Auto classes there, which loads torch first).
COMMAND_LINE = ["-m", "flash_experts.cli.main", "generate", "/nonexistent-model", "--prompt", "x"]


def libgomp_spin_count(arguments: list[str], **env: str) -> str:
    """The spin count libgomp itself reports it took (OMP_DISPLAY_ENV=verbose prints its settings when torch loads
    it): how long a waiting thread spins before it sleeps."""
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True,
                            env={**environment, "OMP_DISPLAY_ENV": "verbose", **env})
    (line,) = [line for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    return line.split("=")[1].strip().strip("'")


def test_the_command_line_makes_openmps_waiting_threads_sleep_and_a_users_setting_wins():
    """Reference: libgomp's own report of its settings. Its default spins 300,000 times before a waiting thread
    sleeps (what costs a busy machine 3-5x, BENCHMARKS.md); the command line's process sleeps at once."""
    import torch

    if "gomp" not in " ".join(p.name for p in Path(torch.__file__).parent.joinpath("lib").iterdir()):
        pytest.skip("this torch does not run on GNU libgomp")
    assert libgomp_spin_count(["-c", "import torch"]) == "300000"
    assert libgomp_spin_count(COMMAND_LINE) == "0"
    assert libgomp_spin_count(COMMAND_LINE, GOMP_SPINCOUNT="5000") == "5000"
    assert libgomp_spin_count(COMMAND_LINE, OMP_WAIT_POLICY="active") != "0"
