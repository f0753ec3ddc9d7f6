"""flash-experts: GPT-2 (and Llama-family) models upcycled to Mixture-of-Experts, with our Flash Attention.

The public names below load on first use (PEP 562), so that `import flash_experts` does not import torch:
the command line sets torch's environment (`flash_experts.cli.main`) before torch first allocates memory.

Our two model types are registered with transformers' Auto classes (`AutoModelForCausalLM.from_pretrained(
our_folder)`, `pipeline(...)`) when `flash_experts.model` is imported: by any public name of the package, by
`import flash_experts.model`, or by `import flash_experts` itself when transformers is already imported.
A folder we saved also loads where this package is absent, as remote code (`trust_remote_code=True`).
"""

from __future__ import annotations

import importlib
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


if "transformers" in sys.modules:
    importlib.import_module("flash_experts.model.registry")
