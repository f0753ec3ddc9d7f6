"""A static, preallocated KV cache (gpt-fast style).

Keys and values for every layer live in tensors of the final length, allocated once; decoding writes in
place instead of concatenating (no reallocation per token). It follows the small part of the
transformers `Cache` interface our models and `generate` use: `update(key, value, layer_idx)` and
`get_seq_length()`, so the same model code also accepts a transformers `DynamicCache`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from flash_experts.errors import UserError


class LayerCache(Protocol):
    """What the attention layers need of a cache: ours (`KVCache`) and transformers' `DynamicCache` both fit."""

    def update(self, key: Tensor, value: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Append one layer's (B, Hkv, T, Dh) keys and values; return all that layer holds."""
        ...

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already cached."""
        ...


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_length = max_length

    def update(self, key: Tensor, value: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, T, Dh) keys/values of one layer; return that layer's whole cached (B, Hkv, L, Dh)."""
        start = self.lengths[layer_idx]
        end = start + key.shape[-2]
        if end > self.max_length:
            raise UserError(f"KV cache is full: {end} positions needed, {self.max_length} allocated")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
