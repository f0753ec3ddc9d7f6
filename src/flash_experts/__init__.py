"""flash-experts: GPT-2 (and Llama-family) models upcycled to Mixture-of-Experts, with our Flash Attention.

The public names below load on first use (PEP 562), so that `import flash_experts` does not import torch:
the command line sets torch's environment (`flash_experts.cli.main`) before torch first allocates memory.

A plain `import flash_experts` still registers our two model types with transformers' Auto classes
(`AutoModelForCausalLM.from_pretrained(our_folder)`, `pipeline(...)`): at once when transformers is already
imported, otherwise the moment it is (registering needs transformers, and transformers imports torch).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
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


def _register_with_transformers() -> None:
    importlib.import_module("flash_experts.model.registry")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, it wraps that module's loader so that our
    Auto-class registration runs right after transformers' own `__init__` has finished, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (the importlib protocol)
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot, and no recursion while we look up the real spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):  # noqa: ANN001
            exec_module(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
