"""`run.compile`: torch.compile for the training loop, failing safe.

torch.compile is lazy: it traces and compiles each Python frame the first time it runs, inside the first
training step. A frame that cannot be compiled (an unsupported construct, a missing C++ compiler for the
inductor backend, a backend bug) must not end a run that would train correctly without compilation, so
dynamo's `suppress_errors` is switched on (for the process): such a frame runs eagerly, and torch logs why.
Frames that do compile run compiled; the results are the same function (tests/test_compile.py checks a
failing backend and a working one against the eager loss curve).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def compile_fail_safe(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`torch.compile(model, backend=backend)` whose compile failures fall back to eager execution.

    Returns the compiled wrapper (its `_orig_mod` is `model`, which is what gets saved), or `model` itself
    when this torch cannot compile at all."""
    try:
        from torch import _dynamo as dynamo  # imported here: training without compile never loads it

        dynamo.config.suppress_errors = True
        return torch.compile(model, backend=backend)
    except Exception as error:  # noqa: BLE001 - e.g. a Python version torch.compile does not support yet
        warnings.warn(f"run.compile: torch.compile is unavailable here ({error}); training eagerly", stacklevel=2)
        return model
