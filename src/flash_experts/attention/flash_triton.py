"""Flash Attention as fused Triton kernels: forward and backward (FlashAttention-2).

Same algorithm as the readable PyTorch version in flash.py, but each (query block, batch*head) pair is
one GPU program that keeps its tiles in registers / shared memory:

- forward: online softmax over key blocks; stores O and the per-row log-sum-exp (base 2) for backward;
- backward: a preprocess kernel computes D = rowsum(dO * O); then one kernel per key block walks over
  query blocks accumulating dK and dV, and one kernel per query block walks over key blocks
  accumulating dQ. Nothing is shared between programs, so no atomics are needed.

Speed tricks from the Triton tutorial 06-fused-attention: the softmax runs in base 2 with log2(e)
folded into the scale (exp2 is one instruction), and the key (or query) loop is split into stages so
that only the few blocks on the causal diagonal or at the sequence tail pay for masking. Block sizes,
warps and pipeline stages are autotuned on CUDA. Under the Triton interpreter (TRITON_INTERPRET=1, CPU
tensors) one small fixed configuration is used instead, which is how the tests run without a GPU.

Masking semantics (docs/ARCHITECTURE.md): causal is aligned bottom-right (query i sits at absolute
position kv_len - q_len + i), key_padding_mask (batch, kv_len) is True for keys that may be attended to,
and a query row that sees no key returns zeros and gets zero gradients, never NaN.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_experts.attention.contract import check_attention_inputs
from flash_experts.errors import ConfigError, UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; is_triton_available() reports False
    triton = None

LOG2_E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # larger tiles would not fit in shared memory with the tuned block sizes


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_triton_available() -> bool:
    """True when the kernels below can run: Triton is importable and there is a CUDA device, or the
    kernels were built for the Triton CPU interpreter (TRITON_INTERPRET=1 set before this import)."""
    if triton is None:
        return False
    if torch.cuda.is_available():
        return True
    return _BUILT_FOR_INTERPRETER


if triton is not None:
    _BUILT_FOR_INTERPRETER = _interpreting()

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------

    @triton.jit
    def _fwd_inner(acc, row_sum, row_max, q, k_base, v_base, pad_base, stride_kn, stride_vn,
                   offs_m, offs_d, lo, hi, kv_len, causal_offset, qk_scale,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Online softmax over the key blocks [lo, hi). MASKED: apply the causal / tail masks."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]  # K^T tile: (D, BLOCK_N)
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]  # (BLOCK_N, D)
            if MASKED:
                k_t = tl.load(k_ptrs, mask=offs_n[None, :] < kv_len, other=0.0)
            else:
                k_t = tl.load(k_ptrs)
            scores = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), fp32

            if MASKED:
                visible = offs_n[None, :] < kv_len
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
                scores = tl.where(visible, scores, float("-inf"))
            if HAS_PAD:
                keep = tl.load(pad_base + offs_n, mask=offs_n < kv_len, other=0)
                scores = tl.where(keep[None, :] != 0, scores, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
            if MASKED or HAS_PAD:
                # A row that has seen only masked keys keeps max -inf: subtract 0 there so that
                # exp2(-inf - -inf) never makes NaN (its p and alpha come out exactly 0 instead).
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            else:
                safe_max = new_max
            p = tl.math.exp2(scores * qk_scale - safe_max[:, None])
            alpha = tl.math.exp2(row_max - safe_max)  # rescales what was accumulated so far
            row_sum = row_sum * alpha + tl.sum(p, 1)

            if MASKED:
                v = tl.load(v_ptrs, mask=offs_n[:, None] < kv_len, other=0.0)
            else:
                v = tl.load(v_ptrs)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            row_max = new_max
        return acc, row_sum, row_max

    @triton.jit
    def _key_ranges(start_m, kv_len, causal_offset,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """For the query block at start_m: keys [0, full_hi) are seen by every row of the block (no
        masking needed, whole blocks only); keys [full_hi, masked_hi) need masking."""
        if CAUSAL:
            # Row start_m (the block's first) sees keys 0 .. causal_offset + start_m.
            full_hi = tl.maximum(causal_offset + start_m + 1, 0) // BLOCK_N * BLOCK_N
            masked_hi = tl.minimum(causal_offset + start_m + BLOCK_M, kv_len)
        else:
            full_hi = kv_len // BLOCK_N * BLOCK_N
            masked_hi = kv_len
        return full_hi, masked_hi

    @triton.jit
    def _attn_fwd(Q, K, V, PAD, O, LSE,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_pad_b,
                  num_heads, q_len, kv_len, qk_scale, q_bucket, kv_bucket,
                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:
            # Longest query blocks (they see the most keys) first, so the last wave of programs is cheap.
            pid_m = tl.num_programs(0) - 1 - pid_m
        start_m = pid_m * BLOCK_M
        off_bh = tl.program_id(1)
        off_b = (off_bh // num_heads).to(tl.int64)
        off_h = (off_bh % num_heads).to(tl.int64)
        causal_offset = kv_len - q_len  # query i sits at absolute position i + causal_offset

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        pad_base = PAD + off_b * stride_pad_b

        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        full_hi, masked_hi = _key_ranges(start_m, kv_len, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
        acc, row_sum, row_max = _fwd_inner(acc, row_sum, row_max, q, k_base, v_base, pad_base,
                                           stride_kn, stride_vn, offs_m, offs_d, 0, full_hi, kv_len,
                                           causal_offset, qk_scale, BLOCK_N, False, CAUSAL, HAS_PAD,
                                           DOT_PRECISION)
        acc, row_sum, row_max = _fwd_inner(acc, row_sum, row_max, q, k_base, v_base, pad_base,
                                           stride_kn, stride_vn, offs_m, offs_d, full_hi, masked_hi,
                                           kv_len, causal_offset, qk_scale, BLOCK_N, True, CAUSAL,
                                           HAS_PAD, DOT_PRECISION)

        empty = row_sum == 0.0  # rows with no visible key at all
        safe_sum = tl.where(empty, 1.0, row_sum)
        out = acc / safe_sum[:, None]
        # LSE = +inf makes exp2(S - LSE) exactly 0 in backward for such rows: zero gradients.
        lse = tl.where(empty, float("inf"), row_max + tl.math.log2(safe_sum))
        o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)
        tl.store(LSE + off_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)

    # ------------------------------------------------------------------------------------------------
    # Backward
    # ------------------------------------------------------------------------------------------------

    @triton.jit
    def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                        num_heads, q_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """DELTA = rowsum(dO * O) in fp32, the D of dS = P * (dP - D)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        off_bh = tl.program_id(1)
        off_b = (off_bh // num_heads).to(tl.int64)
        off_h = (off_bh % num_heads).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m[:, None] < q_len
        o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                    mask=rows, other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                     + offs_d[None, :], mask=rows, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + off_bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                        offs_n, offs_d, lo, hi, q_len, causal_offset, qk_scale,
                        BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
        """Accumulate dK, dV of one key block over the query blocks [lo, hi). Works on transposed
        scores (keys x queries) so that P^T needs no transpose."""
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
            do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :]
            if MASKED:
                rows = offs_m < q_len
                q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
                lse = tl.load(lse_base + offs_m, mask=rows, other=float("inf"))
                delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)

            scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            p_t = tl.math.exp2(scores_t * qk_scale - lse[None, :])
            if MASKED and CAUSAL:
                visible = offs_n[:, None] <= offs_m[None, :] + causal_offset
                p_t = tl.where(visible, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, PAD, DO, LSE, DELTA,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_pad_b,
                       num_heads, q_len, kv_len, qk_scale, sm_scale, q_bucket, kv_bucket,
                       DK, DV, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                       HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        start_n = tl.program_id(0) * BLOCK_N
        off_bh = tl.program_id(1)
        off_b = (off_bh // num_heads).to(tl.int64)
        off_h = (off_bh % num_heads).to(tl.int64)
        causal_offset = kv_len - q_len

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        keys = offs_n[:, None] < kv_len
        k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=keys, other=0.0)
        v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=keys, other=0.0)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + off_bh.to(tl.int64) * q_len
        delta_base = DELTA + off_bh.to(tl.int64) * q_len

        if CAUSAL:
            # Query i sees key j iff i >= j - causal_offset. Rows before `lo` see none of this block;
            # rows from `need` on see all of it; [lo, full_lo) is a whole number of query blocks.
            lo = tl.maximum(start_n - causal_offset, 0)
            need = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
            full_lo = lo + (need - lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        else:
            lo = 0
            full_lo = 0
        full_hi = full_lo + tl.maximum(q_len - full_lo, 0) // BLOCK_M * BLOCK_M

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # Diagonal blocks (causal mask), then whole unmasked blocks, then the query tail (bounds mask).
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 offs_n, offs_d, lo, tl.minimum(full_lo, q_len), q_len, causal_offset,
                                 qk_scale, BLOCK_M, True, CAUSAL, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 offs_n, offs_d, full_lo, full_hi, q_len, causal_offset,
                                 qk_scale, BLOCK_M, False, CAUSAL, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                 offs_n, offs_d, full_hi, q_len, q_len, causal_offset,
                                 qk_scale, BLOCK_M, True, CAUSAL, DOT_PRECISION)

        dk = dk * sm_scale
        if HAS_PAD:
            # A padded key is never attended to: its gradients are exactly zero. (Its column of P is
            # computed unmasked above, but each key's dK/dV depend only on its own column.)
            keep = tl.load(PAD + off_b * stride_pad_b + offs_n, mask=offs_n < kv_len, other=0) != 0
            dk = tl.where(keep[:, None], dk, 0.0)
            dv = tl.where(keep[:, None], dv, 0.0)
        dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=keys)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=keys)

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kn, stride_vn,
                      offs_m, offs_d, lo, hi, kv_len, causal_offset, qk_scale,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dQ of one query block over the key blocks [lo, hi)."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                k = tl.load(k_ptrs, mask=offs_n[:, None] < kv_len, other=0.0)
                v = tl.load(v_ptrs, mask=offs_n[:, None] < kv_len, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(scores * qk_scale - lse[:, None])
            if MASKED:
                visible = offs_n[None, :] < kv_len
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
                p = tl.where(visible, p, 0.0)
            if HAS_PAD:
                keep = tl.load(pad_base + offs_n, mask=offs_n < kv_len, other=0)
                p = tl.where(keep[None, :] != 0, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, PAD, DO, LSE, DELTA,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_pad_b,
                     num_heads, q_len, kv_len, qk_scale, sm_scale, q_bucket, kv_bucket,
                     DQ, stride_dqb, stride_dqh, stride_dqm,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:
            # Longest query blocks (they see the most keys) first, so the last wave of programs is cheap.
            pid_m = tl.num_programs(0) - 1 - pid_m
        start_m = pid_m * BLOCK_M
        off_bh = tl.program_id(1)
        off_b = (off_bh // num_heads).to(tl.int64)
        off_h = (off_bh % num_heads).to(tl.int64)
        causal_offset = kv_len - q_len

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m < q_len
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=rows[:, None], other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                     + offs_d[None, :], mask=rows[:, None], other=0.0)
        lse = tl.load(LSE + off_bh.to(tl.int64) * q_len + offs_m, mask=rows, other=float("inf"))
        delta = tl.load(DELTA + off_bh.to(tl.int64) * q_len + offs_m, mask=rows, other=0.0)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        pad_base = PAD + off_b * stride_pad_b

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        full_hi, masked_hi = _key_ranges(start_m, kv_len, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kn, stride_vn,
                           offs_m, offs_d, 0, full_hi, kv_len, causal_offset, qk_scale,
                           BLOCK_N, False, CAUSAL, HAS_PAD, DOT_PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kn, stride_vn,
                           offs_m, offs_d, full_hi, masked_hi, kv_len, causal_offset, qk_scale,
                           BLOCK_N, True, CAUSAL, HAS_PAD, DOT_PRECISION)
        dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])

    # ------------------------------------------------------------------------------------------------
    # Launch configurations
    # ------------------------------------------------------------------------------------------------

    _TUNING_KEY = ["q_bucket", "kv_bucket", "HEAD_DIM", "CAUSAL", "HAS_PAD"]

    def _configs(shapes: list[tuple[int, int, int, int]]) -> list:
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in shapes]

    def _drop_oversized(configs: list, named_args: dict, **kwargs) -> list:
        """Short query (e.g. one decoding step) or key sequences: don't tune blocks much larger than them."""
        q_len, kv_len = named_args["q_bucket"], named_args["kv_bucket"]
        kept = [c for c in configs
                if c.kwargs["BLOCK_M"] <= max(q_len, 16) and c.kwargs["BLOCK_N"] <= max(kv_len, 16)]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    def _tuned(kernel, shapes: list[tuple[int, int, int, int]]):
        return triton.autotune(configs=_configs(shapes), key=_TUNING_KEY,
                               prune_configs_by={"early_config_prune": _drop_oversized})(kernel)

    if _BUILT_FOR_INTERPRETER:
        # The CPU interpreter: one small fixed config (unequal blocks, so tile bookkeeping is exercised).
        _FWD, _DKDV, _DQ = _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq
        _FWD_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}
        _DKDV_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}
        _DQ_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}
    else:
        # (BLOCK_M, BLOCK_N, num_warps, num_stages); the backward ones follow the tutorial's choice of
        # a long side for the block a program owns and a short side for the one it streams over.
        _FWD = _tuned(_attn_fwd, [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                  (128, 32, 4, 4), (64, 32, 4, 4), (16, 64, 4, 3)])
        _DKDV = _tuned(_attn_bwd_dkdv, [(32, 128, 4, 5), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3),
                                        (64, 64, 4, 3), (16, 64, 4, 3)])
        _DQ = _tuned(_attn_bwd_dq, [(128, 32, 4, 5), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                                    (64, 32, 4, 3), (16, 64, 4, 3)])
        _FWD_BLOCKS = _DKDV_BLOCKS = _DQ_BLOCKS = {}
else:
    _BUILT_FOR_INTERPRETER = False


def _bucket(n: int) -> int:
    """Autotuning key for a length: powers of two, so decoding with a growing cache re-tunes rarely."""
    return triton.next_power_of_2(max(n, 1))


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _TritonFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None, causal: bool,
                scale: float) -> Tensor:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)  # base-2 LSE per row
        pad_arg = pad if pad is not None else q  # never read when HAS_PAD is False
        common = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_PAD=pad is not None,
                      # fp32 stays exact (no TF32); half types use the tensor cores' default.
                      DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)

        def grid(meta):
            return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

        with _on_device(q):
            _FWD[grid](q, k, v, pad_arg, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                       *out.stride()[:3], pad_arg.stride(0), heads, q_len, kv_len, scale * LOG2_E,
                       _bucket(q_len), _bucket(kv_len), **common, **_FWD_BLOCKS)

        ctx.save_for_backward(q, k, v, pad, out, lse)
        ctx.scale, ctx.common = scale, common
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, pad, out, lse = ctx.saved_tensors
        scale, common = ctx.scale, ctx.common
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        grad_out = _last_dim_contiguous(grad_out)
        pad_arg = pad if pad is not None else q
        delta = torch.empty_like(lse)
        grad_q, grad_k, grad_v = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
        inputs = (q, k, v, pad_arg, grad_out, lse, delta, *q.stride()[:3], *k.stride()[:3],
                  *v.stride()[:3], *grad_out.stride()[:3], pad_arg.stride(0), heads,
                  q_len, kv_len, scale * LOG2_E, scale, _bucket(q_len), _bucket(kv_len))

        with _on_device(q):
            preprocess_block = 64
            _bwd_preprocess[(triton.cdiv(q_len, preprocess_block), batch * heads)](
                out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, q_len,
                HEAD_DIM=head_dim, BLOCK_M=preprocess_block)
            _DKDV[lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]), batch * heads)](
                *inputs, grad_k, grad_v, *grad_k.stride()[:3], *grad_v.stride()[:3],
                **common, **_DKDV_BLOCKS)
            _DQ[lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)](
                *inputs, grad_q, *grad_q.stride()[:3], **common, **_DQ_BLOCKS)
        return grad_q, grad_k, grad_v, None, None, None


def triton_flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax attention with fused Triton kernels, differentiable in q, k and v.

    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim); with causal and q_len > kv_len
    the first q_len - kv_len rows see no key (zeros). fp16, bf16 or fp32 on a CUDA device (or CPU tensors under TRITON_INTERPRET=1); head_dim up
    to 128 (non-powers of two are zero-padded). key_padding_mask: (batch, kv_len) bool, True = may be
    attended to. scale defaults to 1 / sqrt(head_dim). Returns (batch, heads, q_len, head_dim).
    """
    if not is_triton_available():
        raise UserError("the Triton attention kernel needs `triton` and a CUDA GPU (or TRITON_INTERPRET=1 "
                        "set before import, for the slow CPU interpreter); use implementation 'flash' or "
                        "'sdpa' instead")
    check_attention_inputs(q, k, v, causal, key_padding_mask)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}")
    if not (q.device == k.device == v.device) or (not q.is_cuda and not _BUILT_FOR_INTERPRETER):
        raise ConfigError(f"q, k, v must be on one CUDA device; got {q.device}, {k.device}, {v.device}")
    head_dim = q.shape[3]
    if head_dim > MAX_HEAD_DIM:
        raise ConfigError(f"head_dim must be at most {MAX_HEAD_DIM} for the Triton kernel; got {head_dim}")
    if q.shape[0] * q.shape[1] > 65535:
        raise ConfigError(f"batch * heads must be at most 65535 (a CUDA grid limit); "
                         f"got {q.shape[0] * q.shape[1]}")
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if _BUILT_FOR_INTERPRETER and q.dtype == torch.bfloat16:
        # The CPU interpreter's tl.dot gets bf16 wrong (Triton 3.9); compute in fp32 there.
        out = triton_flash_attention(q.float(), k.float(), v.float(), causal, key_padding_mask, scale)
        return out.to(torch.bfloat16)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())  # keep the autograd graph

    # tl.arange and tl.dot need a power-of-two head_dim of at least 16: zero-pad q, k and v (zeros add
    # nothing to q.k, and the padded output columns are sliced away).
    padded_dim = max(16, triton.next_power_of_2(head_dim))
    if padded_dim != head_dim:
        q, k, v = (F.pad(t, (0, padded_dim - head_dim)) for t in (q, k, v))
    out = _TritonFlashAttention.apply(q, k, v, key_padding_mask, bool(causal), float(scale))
    return out[..., :head_dim] if padded_dim != head_dim else out
