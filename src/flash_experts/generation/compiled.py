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
  measured bandwidths). The modules' class is swapped for the length of one `generate` call
  (`decode_products`), so the model files stay plain and eager calls are unchanged;
- an MoE layer's training dispatch (sort by expert, per-expert row counts read on the host) takes a new shape
  every step, which would break the graph in every MoE layer (tried: minutes of compiling, then dynamo's
  recompile limit). In the compiled step it routes by index instead, in fixed shapes (`_DecodeMoELayer`): one
  row (batch 1) reads each of its K experts' weights through the expert index, inside the same multiply-and-sum
  loops, so only the chosen experts' weights are read; several rows run every expert on every row and weight
  the unchosen ones by zero (each weight read once, E/K times the expert arithmetic). Quantized experts
  decode eagerly (with a warning).

The first call compiles (printed by the caller with its time; inductor keeps compiled kernels in its on-disk
cache, so a later process compiles faster). A step that fails to compile decodes eagerly from then on, with a
warning saying why: `generate(..., compile=True)` never fails where eager decoding would not.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_experts.model.kv_cache import KVCache
from flash_experts.model.moe import MoELayer, RouterStats, expert_feed_forward, routing_stats
from flash_experts.model.quantize import QuantizedGroupedExperts
from flash_experts.model.quantize.base import COMPILED_SUM_MAX_ROWS

LENGTH_BUCKET = 128  # cache lengths are rounded up to a multiple of this (one compiled step serves the bucket)
# Each model (and each cache-length bucket) is one more entry of the one compiled function; dynamo's default
# limit of 8 would send a process decoding several models (a benchmark, `compare`) back to eager.
RECOMPILE_LIMIT = 64


def bucketed_length(total_length: int, max_positions: int | None) -> int:
    """The static cache length for `total_length` positions: the next multiple of LENGTH_BUCKET, within the
    model's positions."""
    length = -(-total_length // LENGTH_BUCKET) * LENGTH_BUCKET
    return min(length, max_positions) if max_positions is not None else length


def _decode_one(model: nn.Module, ids_B1: Tensor, positions_B1: Tensor, key_mask_BL: Tensor,
                cache: KVCache) -> Tensor:
    hidden_B1D, _ = model._decode(ids_B1, positions_B1, key_mask_BL, cache)
    return model.lm_head(hidden_B1D)


def _compiled_inference() -> bool:
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def _few_rows(x: Tensor) -> bool:
    return _compiled_inference() and x.numel() // x.shape[-1] <= COMPILED_SUM_MAX_ROWS


class _ReductionLinear(nn.Linear):
    """nn.Linear whose one-row products, when compiled, are a multiply-and-sum over the input features."""

    def forward(self, x: Tensor) -> Tensor:
        if not _few_rows(x) or x.dtype != self.weight.dtype:
            return super().forward(x)
        y = (x[..., None, :].float() * self.weight.float()).sum(-1).to(x.dtype)  # (..., out): weight read once
        return y if self.bias is None else y + self.bias


class _DecodeMoELayer(MoELayer):
    """MoELayer whose compiled decode steps route in fixed shapes: no sort, no row counts on the host.

    The same function as MoELayer.forward: the router's top-k experts, their outputs weighted by the router and
    summed in fp32. A capacity limit can drop assignments only where several rows choose the same expert (one
    row's K assignments go to K distinct experts), so several rows under a capacity limit keep the training
    dispatch."""

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, RouterStats]:
        rows = x_BTD.numel() // x_BTD.shape[-1]
        if not _compiled_inference() or (rows > 1 and self.capacity(rows) is not None):
            return super().forward(x_BTD)
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        weights_TK, experts_TK, logits_TE, probs_TE = self.router(x_TD)
        chosen_TKE = F.one_hot(experts_TK, self.num_experts).to(weights_TK.dtype)
        if rows == 1:  # read only the chosen experts: K expert-indexed products per weight
            out_TD = sum(weights_TK[:, k, None] * _expert_outputs(self.experts, x_TD, experts_TK[:, k])
                         for k in range(self.top_k))
        else:  # every expert on every row, weighted by the router (0 where not chosen)
            weights_TE = (weights_TK[..., None] * chosen_TKE).sum(1)
            out_TD = torch.einsum("te,etd->td", weights_TE, _expert_outputs(self.experts, x_TD))
        # as MoELayer's; the counts in fixed shapes (bincount's output shape depends on the data)
        stats = routing_stats(self.layer_index, logits_TE, probs_TE, chosen_TKE.sum((0, 1)),
                              torch.zeros((), dtype=torch.long, device=x_TD.device))
        return out_TD.to(x_BTD.dtype).reshape(B, T, D), stats


def _expert_outputs(experts: nn.Module, x_TD: Tensor, expert_T: Tensor | None = None) -> Tensor:
    """In fp32: with `expert_T`, (T, D) each row through its own expert, y[t] = FFN_{expert_T[t]}(x[t]), whose
    products are multiply-and-sum loops loading the weights through the index (inductor fuses the indexing:
    nothing is gathered); without, (E, T, D) every expert on every row (batched products, each weight read
    once)."""
    def product(name: str, bias: str | None) -> Callable[[Tensor], Tensor]:
        w_EIO, b_EO = getattr(experts, name), getattr(experts, bias) if bias else None

        def apply(x: Tensor) -> Tensor:
            if expert_T is None:
                y, b = torch.matmul(x.float(), w_EIO.float()), None if b_EO is None else b_EO.float()[:, None, :]
            else:
                y = (x[:, :, None].float() * w_EIO[expert_T].float()).sum(1)
                b = None if b_EO is None else b_EO[expert_T].float()
            return y if b is None else y + b
        return apply

    return expert_feed_forward(x_TD if expert_T is not None else x_TD[None], product("w_up", "b_up"),
                               product("w_gate", None) if experts.gated else None, product("w_down", "b_down"),
                               experts.activation)


# Exact classes only: a subclass (ours or a caller's) may compute something else.
_DECODE_CLASSES: dict[type, type] = {nn.Linear: _ReductionLinear, MoELayer: _DecodeMoELayer}


@contextlib.contextmanager
def decode_products(model: nn.Module) -> Iterator[None]:
    """While inside, the model's float nn.Linear modules compute compiled one-row products as reductions
    (their class swapped for a subclass; the same parameters, the same results up to summation order), and its
    MoE layers route compiled steps in fixed shapes (`_DecodeMoELayer`). GPT-2's Conv1D is left alone: its
    (in, out) weight makes `x @ w` the streaming order already, and the sum over the weight's rows measured
    slower than that (BENCHMARKS.md)."""
    swapped = [(m, type(m)) for m in model.modules() if type(m) in _DECODE_CLASSES]
    for module, cls in swapped:
        module.__class__ = _DECODE_CLASSES[cls]
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


_COMPILED: dict[str, Callable] = {}
# Why compiling failed for a model: remembered for the process, so later calls decode eagerly at once instead of
# failing through the same compilation again.
_FAILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _compiled_step(device_type: str) -> Callable:
    if device_type not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_decode_one, dynamic=False, mode=mode)
    return _COMPILED[device_type]


class CompiledDecoder:
    """Runs decode steps (one token per row) of `model` against `cache` through the compiled step.

    `compile_seconds` is the first call's time (tracing and compiling, plus one step), None before it;
    `failure` says why compilation was given up (decoding then runs eagerly), None while it works."""

    def __init__(self, model: nn.Module, cache: KVCache):
        if not hasattr(model, "_decode") or not isinstance(cache, KVCache):
            raise TypeError("the compiled decode step needs one of our models and its static cache")
        self.model, self.cache = model, cache
        self.compile_seconds: float | None = None
        self.failure: str | None = _FAILED.get(model)
        if any(isinstance(m, QuantizedGroupedExperts) for m in model.modules()):
            self.failure = "the model has quantized MoE experts, whose products run one expert at a time"
            warnings.warn(f"compile: {self.failure}; decoding eagerly", stacklevel=3)

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
                    logits = _compiled_step(ids_B1.device.type)(self.model, ids_B1, positions_B1, key_mask_BL,
                                                                self.cache)
                    if self.compile_seconds is None:
                        self.compile_seconds = time.perf_counter() - start
                    return logits
                except Exception as error:  # noqa: BLE001 - a compiler failure must not end the generation
                    self.failure = _FAILED[self.model] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
                    warnings.warn(f"torch.compile of the decode step failed ({self.failure}); decoding eagerly",
                                  stacklevel=2)
            return _decode_one(self.model, ids_B1, positions_B1, key_mask_BL, self.cache)
        finally:
            for layer in self.cache.layers:
                layer.decode_slot = None
                layer.length = slot + 1
