"""flash-experts: GPT-2 (and Llama-family) models upcycled to Mixture-of-Experts, with our Flash Attention.

`import flash_experts` registers our two model types with transformers' Auto classes
(`AutoModelForCausalLM.from_pretrained(our_folder)`, `pipeline(...)`), whichever of the two packages a program
imports first. Registering imports transformers' Auto modules, and with them torch (about two seconds), so
the programs that import this package without it are our own: the command line (`flash-experts`, `python -m
flash_experts...`) must set torch's environment (`flash_experts.cli.main`) before torch first loads and keeps
`--help` instant, and so do the repository's examples and benchmarks; they register when they import
`flash_experts.model`. There is no import hook: this module's last lines run once, as read. The public
names load on first use (PEP 562).
A folder we saved also loads where this package is absent, as remote code (`trust_remote_code=True`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "attention": "flash_experts.attention",
    "flash_attention": "flash_experts.attention",
    "GPT2MoEConfig": "flash_experts.model",
    "GPT2MoEForCausalLM": "flash_experts.model",
    "LlamaMoEConfig": "flash_experts.model",
    "LlamaMoEForCausalLM": "flash_experts.model",
    "upcycle": "flash_experts.model",
    "upcycle_gpt2": "flash_experts.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flash_experts' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# The console script's name, as pyproject.toml's [project.scripts] declares it (pip may add a suffix on Windows).
COMMAND_LINE_SCRIPTS = ("flash-experts", "flash-experts.exe", "flash-experts-script.py")
# Folders of the repository whose scripts set torch's environment before torch loads (their common.py).
OWN_SCRIPT_FOLDERS = ("examples", "benchmarks")


def sets_torch_environment_first(argv: list[str], orig_argv: list[str], main_file: str | None) -> bool:
    """True when this process is one of our own programs, which set torch's environment before torch loads
    (cpu_memory.py) and register through `flash_experts.model` when they need it: the console script,
    `python -m flash_experts...` (while runpy imports the package, argv[0] is still "-m"; orig_argv names the
    module), or a script in this repository's examples/ or benchmarks/ (a checkout: src/flash_experts here)."""
    if argv and os.path.basename(argv[0]) in COMMAND_LINE_SCRIPTS:
        return True
    if argv and argv[0] == "-m" and "-m" in orig_argv[:-1]:
        return orig_argv[orig_argv.index("-m") + 1].split(".")[0] == __name__
    if main_file:
        folder = os.path.dirname(os.path.abspath(main_file))
        repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return os.path.basename(folder) in OWN_SCRIPT_FOLDERS and os.path.dirname(folder) == repository
    return False


if not sets_torch_environment_first(sys.argv, getattr(sys, "orig_argv", []),
                                    getattr(sys.modules.get("__main__"), "__file__", None)):
    try:
        importlib.import_module("flash_experts.model.registry")
    except ImportError as missing:  # transformers (or torch) absent: nothing to register with
        if missing.name not in ("transformers", "torch"):
            raise
