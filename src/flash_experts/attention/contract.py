"""The attention contract every implementation shares, and the plain math it is checked against.

`check_attention_inputs` enforces the shapes and dtypes; `visibility_mask` says which keys each query sees
(causal masks aligned bottom-right, `key_padding_mask` True for real tokens); `attention_probabilities` is the
softmax over that mask (the studio's recording implementation keeps it) and `eager_attention` textbook softmax
attention with it, a query with no visible key returning zeros. The dispatch and both flash implementations
import this module; it imports none of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flash_experts.errors import ConfigError


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                           key_padding_mask: Tensor | None) -> None:
    """The contract every implementation shares (shapes, one dtype, mask shape); a ValueError that says which
    part is off. Causal q_len > kv_len is allowed: bottom-right alignment puts the first q_len - kv_len
    queries before every key, so they see none and return zeros (as flash-attn does)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(f"q, k, v must be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ConfigError(f"q, k, v shapes do not fit together: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ConfigError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ConfigError(f"key_padding_mask must be (batch, kv_len) = {(k.shape[0], k.shape[2])}; "
                         f"got {tuple(key_padding_mask.shape)}")


def visibility_mask(q_len: int, kv_len: int, causal: bool, key_padding_mask: Tensor | None,
                    device: torch.device) -> Tensor | None:
    """Boolean (B or 1, 1, Tq, Tk) mask of the keys each query may see, or None when it sees all."""
    mask = None
    if causal and q_len > 1:
        # Bottom-right alignment: query i sits at absolute position kv_len - q_len + i.
        query_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        mask = (torch.arange(kv_len, device=device)[None, :] <= query_pos[:, None])[None, None]
    if key_padding_mask is not None:
        padding = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = padding if mask is None else (mask & padding)
    return mask


def attention_probabilities(q: Tensor, k: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None,
                            scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) over the visible keys, in fp32: (B, H, Tq, Tk); a row with no visible key is 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    mask = visibility_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.nan_to_num(0.0)  # rows with no visible key: all -inf -> NaN -> 0
    return probs


def eager_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """Textbook attention with the full score matrix (softmax in fp32)."""
    probs = attention_probabilities(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return torch.matmul(probs, v.float()).to(q.dtype)
