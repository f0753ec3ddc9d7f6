"""An attention implementation that keeps what the fast ones never form: the attention probabilities.

The studio draws them. A model whose config names a `RecordingAttention` as its attention implementation
(`running_attention(model, recorder)`, for the length of one forward) runs every layer's attention
through it: it records softmax(q k^T * scale) under the same causal and padding masks as the contract
(docs/ARCHITECTURE.md), then returns what the model's own implementation computes, so the forward is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from flash_experts.attention.contract import visibility_mask
from flash_experts.attention.dispatch import attention


class RecordingAttention:
    """Keeps, per call (one per layer, in order), the first row's probabilities (H, Tq, Tk) in float32 on the
    CPU, and returns `inner`'s output (an implementation name)."""

    def __init__(self, inner: str):
        self.inner = inner
        self.maps: list[Tensor] = []

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale
        allowed = visibility_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
        self.maps.append(scores.softmax(dim=-1)[0].cpu())
        return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, implementation=self.inner,
                         scale=scale)


@contextlib.contextmanager
def running_attention(model: Any, implementation: Any) -> Iterator[None]:
    """While inside, `model` (one of this package's, whose layers read `config.attention_implementation` at
    every call) runs `implementation`; its own choice is restored after."""
    config = model.config
    saved = config.attention_implementation
    config.attention_implementation = implementation
    try:
        yield
    finally:
        config.attention_implementation = saved
