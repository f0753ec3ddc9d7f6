"""A static, preallocated KV cache (gpt-fast style) that is also a transformers `Cache`.

Keys and values for every layer live in tensors of the final length, allocated once; decoding writes in
place instead of concatenating (no reallocation per token). `update` returns only the filled prefix, so
attention needs no mask over empty slots (transformers' own `StaticCache` returns the whole buffer and
relies on a 4D mask, which our attention does not take).

Being a `transformers.cache_utils.Cache` lets the same object go to `model.generate(cache=...)`: beam search
reorders it (`reorder_cache`), and `generate` reads its length. Our models also accept transformers'
`DynamicCache` (what `generate` makes when given none); `LayerCache` is the part of the interface they use.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from flash_experts.errors import UserError


class LayerCache(Protocol):
    """What the attention layers need of a cache: ours (`KVCache`) and transformers' `DynamicCache` both fit."""

    def update(self, key: Tensor, value: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Append one layer's (B, Hkv, T, Dh) keys and values; return all that layer holds."""
        ...

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already cached."""
        ...


class StaticKVLayer(CacheLayerMixin):
    """One layer's preallocated (B, Hkv, max_length, Dh) keys and values and how many positions are filled."""

    is_compileable = False  # transformers would then build a 4D mask over the whole buffer for `generate`
    is_croppable = True
    is_sliding = False

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.keys.device
        self.length = 0
        self.is_initialized = True
        self.decode_slot: Tensor | None = None  # (1,) long: set only by the compiled decode step

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass  # allocated up front

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.decode_slot is not None:
            # The compiled decode step (generation/compiled.py): write at a slot given as a tensor and return the
            # whole buffer, so every step has the same shapes; a key padding mask hides the slots not yet filled.
            self.keys.index_copy_(2, self.decode_slot, key_states)
            self.values.index_copy_(2, self.decode_slot, value_states)
            return self.keys, self.values
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            raise UserError(f"KV cache is full: {end} positions needed, {self.keys.shape[-2]} allocated")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise UserError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.length = 0  # the stale values are overwritten before they are read again

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # In place, so the tensors keep their size and address (the base class would rebind them).
        index = beam_idx.to(self.device)
        self.keys.copy_(self.keys.index_select(0, index))
        self.values.copy_(self.values.index_select(0, index))


class KVCache(Cache):
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        super().__init__(layers=[StaticKVLayer(shape, dtype, device) for _ in range(num_layers)])

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, T, Dh) keys/values of one layer; return that layer's whole cached (B, Hkv, L, Dh)."""
        return self.layers[layer_idx].update(key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
