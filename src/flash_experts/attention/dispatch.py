"""The one attention dispatch: every model calls `attention(...)` and names an implementation.

- "flash":  ours, tiled online softmax in PyTorch (`flash.py`): O(T) memory, the readable reference.
- "triton": ours, the fused GPU kernel (`flash_triton.py`).
- "sdpa":   PyTorch's `scaled_dot_product_attention` (its fused kernels; the fast default on CPU).
- "eager":  plain softmax(q k^T) v with the full T x T matrix (the textbook reference).
- "auto":   the fastest measured: "sdpa" (see AUTO_PICKS_TRITON for when it will take "triton" on CUDA)
- an object with the same call as `attention` minus `implementation` (`recording.RecordingAttention`, which
  keeps the probabilities the studio draws): a model whose config names it runs that object.

All of them share one set of semantics (see docs/ARCHITECTURE.md): causal masks are aligned bottom-right so a
query shorter than the keys (KV-cache decoding) sees the whole past, `key_padding_mask` (B, Tk) marks real
tokens, and a query with no visible key returns zeros.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_experts.attention.contract import eager_attention, visibility_mask
from flash_experts.errors import ConfigError

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash", "eager", "triton", "auto")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None,
              implementation: str | Callable[..., Tensor] = "sdpa", scale: float | None = None) -> Tensor:
    """q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh). Returns (B, H, Tq, Dh); causal rows before the first key
    (Tq > Tk) see no key and return zeros."""
    if callable(implementation):
        return implementation(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if implementation == "auto":
        implementation = resolve_auto(q)
    if implementation == "sdpa":
        return _sdpa(q, k, v, causal, key_padding_mask, scale)
    if implementation == "flash":
        from flash_experts.attention.flash import flash_attention

        return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if implementation == "triton":
        from flash_experts.attention.flash_triton import triton_flash_attention

        return triton_flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if implementation == "eager":
        return eager_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    raise ConfigError(
        f"attention_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)} (got {implementation!r})"
    )


# Whether "auto" takes our Triton kernel on CUDA (fp16/bf16, head_dim 64/128). The kernel matches a float64
# reference under Triton's interpreter; "auto" takes it only once a GPU run (`bash benchmarks/gpu_check.sh`,
# figures in BENCHMARKS.md) shows it at least as fast as SDPA's flash backend. "triton" selects it explicitly.
AUTO_PICKS_TRITON = False


def resolve_auto(q: Tensor) -> str:
    """The implementation "auto" picks for tensors like `q`."""
    if (AUTO_PICKS_TRITON and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (64, 128)):
        try:
            from flash_experts.attention.flash_triton import is_triton_available
        except ImportError:
            return "sdpa"
        if is_triton_available():
            return "triton"
    return "sdpa"


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None,
          scale: float | None) -> Tensor:
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if q_len == 1 and q.device.type == "cpu" and (q.dtype != torch.float32 or q.shape[0] > 1):
        # Decoding on CPU: for one query per row SDPA's CPU kernels are slower than the plain fp32 math
        # (two small matmuls and a softmax), which is also what they compute: faster in bf16 and in fp32
        # from batch 2 up (BENCHMARKS.md, bench_generate); SDPA stays for one fp32 row, where it is not slower.
        return eager_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if key_padding_mask is None and (not causal or q_len == kv_len or q_len == 1):
        # The fused kernels' own causal mask is aligned top-left, which is right only when q_len == kv_len.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q_len > 1, scale=scale)
    mask = visibility_mask(q_len, kv_len, causal, key_padding_mask, q.device)
    # A row with no visible key would give NaN inside SDPA: let it see everything, then zero its output.
    has_visible = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_visible, scale=scale)
    return out.masked_fill(~has_visible, 0.0)
