"""An attention implementation that keeps what the fast ones never form: the attention probabilities.

The studio draws them. A model whose config names a `RecordingAttention` as its attention implementation
(`running_attention(model, recorder)`, for the length of one forward) runs every layer's attention
through it: it records softmax(q k^T * scale) under the same causal and padding masks as the contract
(docs/ARCHITECTURE.md), then returns what the model's own implementation computes, so the forward is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from flash_experts.attention.contract import attention_probabilities
from flash_experts.attention.dispatch import attention


class RecordingAttention:
    """Keeps, per call (one per layer, in order), the first row's probabilities (H, Tq, Tk) in float32 on the
    CPU, and returns `inner`'s output (an implementation name)."""

    def __init__(self, inner: str):
        self.inner = inner
        self.maps: list[Tensor] = []

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
        probs = attention_probabilities(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        self.maps.append(probs[0].cpu())
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
