"""Flash Attention in plain PyTorch: tiled online softmax, forward and backward (FlashAttention-2).

This is the readable reference of the algorithm (the fused GPU kernel lives in flash_triton.py). Memory
is linear in sequence length: the forward never builds the (q_len, kv_len) score matrix, it walks over
blocks of keys keeping a running row max `m`, a running normaliser `l` and an unnormalised output
accumulator, and keeps only the output O and the per-row log-sum-exp L = m + log(l) for backward. The
backward recomputes each score block from Q, K and L (P = exp(S - L)) and uses
D_i = rowsum(dO_i * O_i), so dS = P * (dP - D) needs no softmax matrix either.

Blocks are looped over in Python; inside a block batch and heads are handled at once by batched matmuls.
Softmax statistics and accumulators are fp32 whatever the input dtype; the result has the input dtype.

Masking semantics (see docs/ARCHITECTURE.md):
- causal is aligned bottom-right: query i sits at absolute position kv_len - q_len + i;
- key_padding_mask (batch, kv_len) bool, True = a real token that may be attended to;
- a query row that sees no key returns zeros (and gets zero gradients), never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flash_experts.attention.contract import check_attention_inputs
from flash_experts.errors import ConfigError


def _block_visibility(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    causal_offset: int | None,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Bool mask of the (q block, k block) scores that may be attended to, or None when all may.

    Shape broadcasts against scores (batch, heads, block_q, block_k): (block_q, block_k) for causality
    alone, (batch, 1, 1 or block_q, block_k) once padding is involved.
    """
    visible = None
    # Causal masking only matters when the block's last key lies after the block's first query.
    if causal_offset is not None and k_end - 1 > causal_offset + q_start:
        query_pos = torch.arange(q_start, q_end, device=device) + causal_offset  # (block_q,)
        key_pos = torch.arange(k_start, k_end, device=device)  # (block_k,)
        visible = key_pos[None, :] <= query_pos[:, None]  # (block_q, block_k)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, k_start:k_end]  # (batch, 1, 1, block_k)
        visible = keep if visible is None else keep & visible
    return visible


def _visible_keys_end(q_end: int, causal_offset: int | None, kv_len: int) -> int:
    """One past the last key any query in [.., q_end) may see: key blocks starting there are skipped."""
    if causal_offset is None:
        return kv_len
    return min(kv_len, causal_offset + q_end)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None,
                scale: float, block_size: int) -> Tensor:
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        causal_offset = kv_len - q_len if causal else None

        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)  # per query row
        k32, v32 = k.float(), v.float()  # no copy for fp32 inputs; linear memory otherwise

        for q_start in range(0, q_len, block_size):
            q_end = min(q_start + block_size, q_len)
            q_blk = q[:, :, q_start:q_end].float() * scale  # (B, H, bq, D)
            row_max = torch.full((batch, heads, q_end - q_start), -math.inf, device=q.device,
                                 dtype=torch.float32)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros(batch, heads, q_end - q_start, head_dim, device=q.device, dtype=torch.float32)

            for k_start in range(0, _visible_keys_end(q_end, causal_offset, kv_len), block_size):
                k_end = min(k_start + block_size, kv_len)
                scores = q_blk @ k32[:, :, k_start:k_end].transpose(-2, -1)  # (B, H, bq, bk)
                visible = _block_visibility(q_start, q_end, k_start, k_end, causal_offset,
                                            key_padding_mask, q.device)
                if visible is not None:
                    scores = scores.masked_fill(~visible, -math.inf)

                new_max = torch.maximum(row_max, scores.amax(dim=-1))
                # Rows that have seen only masked keys keep max -inf; subtract 0 there so that
                # exp(-inf - (-inf)) never produces NaN (their p and alpha are exactly 0 instead).
                safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                p = torch.exp(scores - safe_max[..., None])
                alpha = torch.exp(row_max - safe_max)  # rescales what was accumulated so far
                row_sum = row_sum * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + p @ v32[:, :, k_start:k_end]
                row_max = new_max

            empty = row_sum == 0  # rows with no visible key at all
            out[:, :, q_start:q_end] = (acc / torch.where(empty, 1.0, row_sum)[..., None]).to(q.dtype)
            # L = +inf makes exp(S - L) exactly 0 in backward for such rows: zero gradients.
            lse[:, :, q_start:q_end] = torch.where(empty, math.inf, row_max + torch.log(row_sum))

        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.scale, ctx.block_size = causal, scale, block_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        scale, block_size = ctx.scale, ctx.block_size
        q_len, kv_len = q.shape[2], k.shape[2]
        causal_offset = kv_len - q_len if ctx.causal else None

        q32 = q.float() * scale
        k32, v32 = k.float(), v.float()
        grad_out32 = grad_out.float()
        delta = (grad_out32 * out.float()).sum(dim=-1)  # D_i = rowsum(dO * O): (B, H, q_len)
        grad_q = torch.zeros_like(q32)
        grad_k = torch.zeros_like(k32)
        grad_v = torch.zeros_like(v32)

        # Outer loop over key blocks so dK and dV of a block are finished in one pass; dQ accumulates.
        for k_start in range(0, kv_len, block_size):
            k_end = min(k_start + block_size, kv_len)
            k_blk, v_blk = k32[:, :, k_start:k_end], v32[:, :, k_start:k_end]
            grad_k_blk = torch.zeros_like(k_blk)
            grad_v_blk = torch.zeros_like(v_blk)
            # Causality: the first query that sees key k_start sits at absolute position k_start.
            first_query = 0 if causal_offset is None else max(0, k_start - causal_offset)
            first_q_block = (first_query // block_size) * block_size
            for q_start in range(first_q_block, q_len, block_size):
                q_end = min(q_start + block_size, q_len)
                q_blk = q32[:, :, q_start:q_end]
                grad_out_blk = grad_out32[:, :, q_start:q_end]

                scores = q_blk @ k_blk.transpose(-2, -1)  # (B, H, bq, bk)
                visible = _block_visibility(q_start, q_end, k_start, k_end, causal_offset,
                                            key_padding_mask, q.device)
                if visible is not None:
                    scores = scores.masked_fill(~visible, -math.inf)
                p = torch.exp(scores - lse[:, :, q_start:q_end, None])  # softmax probabilities

                grad_v_blk += p.transpose(-2, -1) @ grad_out_blk
                grad_p = grad_out_blk @ v_blk.transpose(-2, -1)
                grad_scores = p * (grad_p - delta[:, :, q_start:q_end, None])
                grad_q[:, :, q_start:q_end] += grad_scores @ k_blk
                grad_k_blk += grad_scores.transpose(-2, -1) @ q_blk  # q_blk already carries the scale
            grad_k[:, :, k_start:k_end] = grad_k_blk
            grad_v[:, :, k_start:k_end] = grad_v_blk

        grad_q = (grad_q * scale).to(q.dtype)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block_size: int = 64,
) -> Tensor:
    """Exact softmax attention in O(sequence) memory, differentiable in q, k and v.

    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim); with causal and q_len > kv_len
    the first q_len - kv_len rows see no key (zeros). key_padding_mask: (batch, kv_len) bool, True = may be attended to. scale defaults to
    1 / sqrt(head_dim). Returns (batch, heads, q_len, head_dim) in q's dtype.
    """
    check_attention_inputs(q, k, v, causal, key_padding_mask)
    if block_size < 1:
        raise ConfigError(f"block_size must be positive; got {block_size}")
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _FlashAttention.apply(q, k, v, causal, key_padding_mask, float(scale), int(block_size))
