"""`run.compile`: torch.compile for the training loop, failing safe.

torch.compile is lazy: it traces and compiles each Python frame the first time it runs, inside the first
training step. A graph the backend cannot compile (a missing C++ compiler for the inductor backend, a backend
bug) must not end a run that would train correctly without compilation, so the backend is wrapped: a graph it
fails on runs as captured, eagerly, with one warning saying why. Nothing is changed for the process (dynamo's
own settings stay as they are). The results are the same function (tests/test_compile.py checks a failing
backend and a working one against the eager loss curve).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn


def compile_fail_safe(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """`torch.compile(model, backend=backend)` whose compile failures fall back to eager execution.

    Returns the compiled wrapper (its `_orig_mod` is `model`, which is what gets saved), or `model` itself
    when this torch cannot compile at all."""
    try:
        from torch._dynamo import lookup_backend  # imported here: training without compile never loads dynamo

        return torch.compile(model, backend=_eager_on_failure(lookup_backend(backend)))
    except Exception as error:  # noqa: BLE001 - e.g. a Python version torch.compile does not support yet
        warnings.warn(f"run.compile: torch.compile is unavailable here ({error}); training eagerly", stacklevel=2)
        return model


def _eager_on_failure(compiler: Callable) -> Callable:
    """A dynamo backend that is `compiler`, except that a graph it fails on runs eagerly as captured."""
    warned: list[str] = []

    def compile_or_run_eagerly(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        try:
            return compiler(graph_module, example_inputs)
        except Exception as error:  # noqa: BLE001 - a compiler failure must not end a run
            if not warned:
                warned.append(str(error))
                warnings.warn(f"run.compile: a graph failed to compile ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]}); it runs eagerly", stacklevel=2)
            return graph_module.forward

    return compile_or_run_eagerly
