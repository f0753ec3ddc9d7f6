"""Triton flash attention (forward and backward) against plain softmax attention in float64.

Without a GPU the kernels run in the Triton CPU interpreter (TRITON_INTERPRET=1) at tiny shapes; the
interpreter config uses 32x16 / 16x32 blocks, so lengths like 37 or 53 cross several blocks and end in
partial ones. GPU-only tests (marked `gpu`) check realistic shapes in fp16/bf16 against fp32 math.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before the kernels are decorated: Triton picks interpreter or GPU per kernel then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")

from flash_experts.attention import flash_triton  # noqa: E402

# flash_triton may have been imported earlier in this pytest process (e.g. through the attention
# dispatch) before the flag was set: then its kernels were built for a GPU and cannot run here (reloading
# the module does not help, the interpreter keeps the old nested kernels). This file then reruns itself
# in a fresh process with the flag set from the start.
RERUN_IN_SUBPROCESS = not flash_triton.is_triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
if not flash_triton.is_triton_available() and not RERUN_IN_SUBPROCESS:
    pytest.skip("Triton kernels cannot run here: no CUDA device and TRITON_INTERPRET is not 1",
                allow_module_level=True)

from flash_experts.attention.flash_triton import triton_flash_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _only_where_kernels_can_run(request):
    if RERUN_IN_SUBPROCESS and request.node.originalname != "test_this_file_in_a_fresh_interpreter_process":
        pytest.skip("flash_triton was imported before TRITON_INTERPRET=1 was set; runs in a subprocess")


def test_this_file_in_a_fresh_interpreter_process():
    """Reference: this file's own tests, run in a process where the interpreter flag precedes triton."""
    if not RERUN_IN_SUBPROCESS:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def reference_attention(q, k, v, causal, key_padding_mask=None, scale=None):
    """Plain softmax attention in float64 with the contract's masking (bottom-right causal, True=keep,
    rows that see no key give zeros)."""
    q, k, v = q.double(), k.double(), v.double()
    q_len, kv_len = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, q_len, kv_len)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        query_pos = torch.arange(q_len, device=q.device) + (kv_len - q_len)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= query_pos[:, None]
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return torch.nan_to_num(probs, nan=0.0) @ v  # all-masked rows: softmax gives NaN -> zeros


def make_qkv(batch, heads, q_len, kv_len, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, head_dim)] + [(batch, heads, kv_len, head_dim)] * 2
    return [torch.randn(s, generator=gen).to(DEVICE, dtype).requires_grad_() for s in shapes]


def check_against_reference(q, k, v, causal, key_padding_mask=None, scale=None):
    """Outputs and gradients of q, k, v from the kernel equal the float64 reference's."""
    out = triton_flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, q.dtype)
    out.backward(grad_out)

    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref_inputs, causal, key_padding_mask, scale)
    ref_out.backward(grad_out.double())

    tol = TOLERANCE[q.dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for name, got, ref in zip("qkv", (q, k, v), ref_inputs):
        assert torch.isfinite(got.grad).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=tol, rtol=tol, msg=f"d{name} differs")
    return out


@pytest.mark.parametrize(
    "causal, q_len, kv_len, head_dim",
    [
        (True, 37, 37, 32),  # lengths not a multiple of any block
        (False, 40, 53, 64),  # q_len != kv_len, both with partial tail blocks
        (True, 1, 45, 32),  # one decoding step against a KV cache: sees every key
        (True, 19, 50, 64),  # chunked prefill: bottom-right causal with an offset of 31
        (True, 64, 64, 64),  # exact multiples of the blocks: no tails at all
        (False, 80, 7, 32),  # fewer keys than one key block
        (True, 16, 16, 128),  # head_dim 128 at a tiny shape
        (True, 21, 29, 48),  # head_dim that is not a power of two (zero-padded to 64)
    ],
)
def test_matches_float64_reference_outputs_and_grads(causal, q_len, kv_len, head_dim):
    """Reference: plain softmax attention in float64; fp32 kernel output and dq, dk, dv agree."""
    check_against_reference(*make_qkv(2, 2, q_len, kv_len, head_dim), causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_and_fully_masked_rows_match_reference(causal):
    """Reference: float64 softmax attention; left padding gives zero rows, zero grads, never NaN."""
    q, k, v = make_qkv(2, 2, 33, 33, 32)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[0, :5] = False  # left padding: causal query rows 0..4 of batch 0 see no key at all
    mask[1, 10:20:3] = False  # holes in the middle
    if not causal:
        mask[0] = False  # non-causal: every row of batch 0 sees nothing
    mask = mask.to(DEVICE)
    out = check_against_reference(q, k, v, causal=causal, key_padding_mask=mask)

    empty_rows = slice(0, 5) if causal else slice(None)
    assert (out[0, :, empty_rows] == 0).all()
    assert (q.grad[0, :, empty_rows] == 0).all()
    assert (k.grad[~mask[:, None, :, None].expand_as(k)] == 0).all()  # padded keys get no gradient
    assert (v.grad[~mask[:, None, :, None].expand_as(v)] == 0).all()


def test_single_query_against_padded_cache_matches_reference():
    """Reference: float64 softmax attention; decoding with a left-padded batch and a custom scale."""
    q, k, v = make_qkv(2, 2, 1, 26, 64)
    mask = torch.ones(2, 26, dtype=torch.bool)
    mask[1, :9] = False
    check_against_reference(q, k, v, causal=True, key_padding_mask=mask.to(DEVICE), scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(dtype):
    """Reference: float64 softmax attention of the same half-precision inputs (looser tolerance).

    Under the CPU interpreter bf16 is computed in fp32 (its tl.dot mishandles bf16); on a GPU it is real.
    """
    check_against_reference(*make_qkv(1, 2, 45, 45, 64, dtype=dtype), causal=True)


def test_strided_views_from_a_fused_qkv_projection_match_reference():
    """Reference: float64 attention on contiguous copies; q, k, v here are non-contiguous views."""
    batch, seq, heads, head_dim = 2, 27, 2, 32
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device=DEVICE, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views, stride(2) = 3*H*D
    out = triton_flash_attention(q, k, v, causal=True)
    out.sum().backward()

    ref_qkv = qkv.detach().double().requires_grad_()
    ref_out = reference_attention(*(ref_qkv[:, :, i].transpose(1, 2) for i in range(3)), causal=True)
    ref_out.sum().backward()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "q_shape, k_shape, kwargs, message",
    [
        ((1, 2, 8, 32), (1, 3, 8, 32), {}, "do not fit"),
        ((1, 2, 8, 512), (1, 2, 8, 512), {}, "head_dim"),
        ((1, 2, 8, 32), (1, 2, 8, 32), {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)},
         "key_padding_mask"),
    ],
)
def test_bad_arguments_raise_value_error(q_shape, k_shape, kwargs, message):
    """Reference: the documented contract (shapes, head_dim limit, mask shape)."""
    q, k = torch.zeros(q_shape, device=DEVICE), torch.zeros(k_shape, device=DEVICE)
    if "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = kwargs["key_padding_mask"].to(DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_flash_attention(q, k, k, **kwargs)


def test_integer_inputs_raise_value_error():
    """Reference: the contract allows fp16, bf16 and fp32 only."""
    q = torch.zeros(1, 1, 4, 16, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        triton_flash_attention(q, q, q)


# ---------------------------------------------------------------------------------------------------
# GPU only: realistic shapes, compiled kernels with autotuned blocks.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal, q_len, kv_len, head_dim", [(True, 1000, 1000, 64), (False, 513, 1024, 128),
                                                             (True, 1, 777, 64), (True, 300, 2048, 64)])
def test_gpu_large_shapes_match_reference(dtype, causal, q_len, kv_len, head_dim):
    """Reference: float64 softmax attention; compiled kernels at realistic lengths with tails."""
    q, k, v = make_qkv(2, 4, q_len, kv_len, head_dim, dtype=dtype)
    mask = torch.ones(2, kv_len, dtype=torch.bool, device=DEVICE)
    mask[1, : kv_len // 3] = False
    check_against_reference(q, k, v, causal=causal, key_padding_mask=mask)


@pytest.mark.gpu
@gpu
def test_gpu_fp32_is_exact_not_tf32():
    """Reference: float64 softmax attention; fp32 inputs keep fp32 accuracy (IEEE dots, not TF32)."""
    check_against_reference(*make_qkv(1, 2, 300, 300, 64), causal=True)
