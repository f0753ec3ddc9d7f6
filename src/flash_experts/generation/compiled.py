"""A compiled one-token decode step: gpt-fast's approach, beside the model code rather than inside it.

Decoding a token on CPU runs a few hundred small operations (30 layers of SmolLM2: norms, rotary, attention,
projections) whose Python and dispatch overhead costs more than the weights take to read (BENCHMARKS.md has
the profile). torch.compile turns the step into a few fused kernels (inductor's C++ backend on CPU; on a GPU
the same graph, where `mode="reduce-overhead"` adds CUDA graphs), but only if every step has the same shapes:

- the KV cache is the static one (`model.make_cache`), sized to a multiple of LENGTH_BUCKET positions, so
  prompts of similar length reuse the compiled step; in decode mode each layer writes the new key and value
  at a slot given as a tensor and attention reads the whole buffer, with a key padding mask over the slots
  not filled yet (masked keys add exactly zero to the softmax, so this is the same arithmetic);
- the prompt itself (prefill) runs eagerly, through the model's own forward;
- inside the compiled step a float nn.Linear of one row (batch 1) is written as a multiply and a sum over the
  input dimension, which inductor turns into one vectorised loop streaming the weight once, faster than the
  library GEMM call torch makes of a one-row `F.linear` (BENCHMARKS.md, "Decoding against llama.cpp", has the
  measured bandwidths). The compiled step runs the model under `OneRowProducts`, a torch function mode that
  computes those products so; the model files stay plain and eager calls never see it;
- an MoE layer's training dispatch (sort by expert, per-expert row counts read on the host) takes a new shape
  every step, which would break the graph in every MoE layer (tried: minutes of compiling, then dynamo's
  recompile limit). For the length of its step the decoder gives every MoE layer the fixed-shape dispatch
  instead (`FixedShapeDispatch`, model/moe.py: gpt-fast's expert indexing), and the layer's own back after.
  Quantized experts decode eagerly (with a warning).

The first call compiles (printed by the caller with its time; inductor keeps compiled kernels in its on-disk
cache, so a later process compiles faster). A step that fails to compile decodes eagerly from then on, with a
warning saying why: `generate(..., compile=True)` never fails where eager decoding would not.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from flash_experts.model.kv_cache import KVCache
from flash_experts.model.moe import SORTED, FixedShapeDispatch, MoELayer
from flash_experts.model.quantize import QuantizedGroupedExperts
from flash_experts.model.quantize.base import COMPILED_SUM_MAX_ROWS

DECODE_DISPATCH = FixedShapeDispatch()  # what every MoE layer runs inside the compiled step
LENGTH_BUCKET = 128  # cache lengths are rounded up to a multiple of this (one compiled step serves the bucket)
# Each model (and each cache-length bucket) is one more entry of the one compiled function; dynamo's default
# limit of 8 would send a process decoding several models (a benchmark, `compare`) back to eager. Raised only
# while the step compiles (`torch._dynamo.config.patch`), never for the process.
RECOMPILE_LIMIT = 64


def bucketed_length(total_length: int, max_positions: int | None) -> int:
    """The static cache length for `total_length` positions: the next multiple of LENGTH_BUCKET, within the
    model's positions."""
    length = -(-total_length // LENGTH_BUCKET) * LENGTH_BUCKET
    return min(length, max_positions) if max_positions is not None else length


class OneRowProducts(TorchFunctionMode):
    """While active and compiling without gradients, `F.linear` of at most COMPILED_SUM_MAX_ROWS rows in the
    weight's dtype is a multiply-and-sum over the input features: (..., out), the weight read once. Every other
    call is F.linear itself. GPT-2's Conv1D (`x @ w`, (in, out): the streaming order already) is not F.linear,
    and the sum over its weight's rows measured slower than that (BENCHMARKS.md)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        if func is F.linear and torch.compiler.is_compiling() and not torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() // x.shape[-1] <= COMPILED_SUM_MAX_ROWS and x.dtype == weight.dtype:
                y = (x[..., None, :].float() * weight.float()).sum(-1).to(x.dtype)
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def decode_step(model: nn.Module, ids_B1: Tensor, positions_B1: Tensor, key_mask_BL: Tensor,
                cache: KVCache) -> Tensor:
    """One token per row through the model: logits (B, 1, V). What the compiled step compiles, and what runs
    eagerly when it cannot."""
    hidden_B1D, _ = model.backbone(ids_B1, positions_B1, key_mask_BL, cache)
    return model.lm_head(hidden_B1D)


def _decode_step_one_row_products(model: nn.Module, ids_B1: Tensor, positions_B1: Tensor, key_mask_BL: Tensor,
                                  cache: KVCache) -> Tensor:
    with OneRowProducts():
        return decode_step(model, ids_B1, positions_B1, key_mask_BL, cache)


_COMPILED: dict[str, Callable] = {}
# Why compiling failed for a model: remembered for the process, so later calls decode eagerly at once instead of
# failing through the same compilation again.
_FAILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _compiled_step(device_type: str) -> Callable:
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_decode_step_one_row_products, dynamic=False, mode=mode)
    return _COMPILED[device_type]


class CompiledDecoder:
    """Runs decode steps (one token per row) of `model` against `cache` through the compiled step.

    `compile_seconds` is the first call's time (tracing and compiling, plus one step), None before it;
    `failure` says why compilation was given up (decoding then runs eagerly), None while it works."""

    def __init__(self, model: nn.Module, cache: KVCache):
        if not hasattr(model, "backbone") or not isinstance(cache, KVCache):
            raise TypeError("the compiled decode step needs one of our models and its static cache")
        self.model, self.cache = model, cache
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.compile_seconds: float | None = None
        self.failure: str | None = _FAILED.get(model)
        if any(isinstance(m, QuantizedGroupedExperts) for m in model.modules()):
            self.failure = "the model has quantized MoE experts, whose products run one expert at a time"
            warnings.warn(f"compile: {self.failure}; decoding eagerly", stacklevel=3)

    @contextlib.contextmanager
    def fixed_shape_dispatch(self):
        """Every MoE layer on DECODE_DISPATCH inside, on its sorted dispatch again after (an eager step, the
        fallback included, runs the layers' own)."""
        for moe_layer in self.moe_layers:
            moe_layer.dispatch = DECODE_DISPATCH
        try:
            yield
        finally:
            for moe_layer in self.moe_layers:
                moe_layer.dispatch = SORTED

    def __call__(self, ids_B1: Tensor, positions_B1: Tensor, slot: int, key_mask_BL: Tensor) -> Tensor:
        """Logits (B, 1, V) for the tokens `ids_B1` at cache slot `slot`; key_mask_BL marks the filled slots
        (this one included) over the whole cache length."""
        slot_1 = torch.tensor([slot], device=ids_B1.device)
        for layer in self.cache.layers:
            layer.decode_slot = slot_1
        try:
            if self.failure is None:
                try:
                    start = time.perf_counter()
                    dynamo_config = torch._dynamo.config
                    with dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)), \
                            self.fixed_shape_dispatch():
                        logits = _compiled_step(ids_B1.device.type)(self.model, ids_B1, positions_B1, key_mask_BL,
                                                                    self.cache)
                    if self.compile_seconds is None:
                        self.compile_seconds = time.perf_counter() - start
                    return logits
                except Exception as error:  # noqa: BLE001 - a compiler failure must not end the generation
                    self.failure = _FAILED[self.model] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
                    warnings.warn(f"torch.compile of the decode step failed ({self.failure}); decoding eagerly",
                                  stacklevel=2)
            return decode_step(self.model, ids_B1, positions_B1, key_mask_BL, self.cache)
        finally:
            for layer in self.cache.layers:
                layer.decode_slot = None
                layer.length = slot + 1
