"""The one attention dispatch: every CPU implementation against plain float64 softmax attention.

The "sdpa" path has its own code for one query per row on CPU (decoding), so the shapes below cover one query
against a cache, with and without padding, batch 1 and several rows, fp32 and bf16; and prompts (q_len > 1).
"""

from __future__ import annotations

import pytest
import torch

from flash_experts.attention import attention
from test_flash_attention import random_qkv, reference_attention

IMPLEMENTATIONS = ("sdpa", "eager", "flash", "auto")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, q_len, kv_len", [(1, 1, 1), (1, 1, 77), (3, 1, 77), (3, 1, 300), (3, 9, 40),
                                                  (2, 33, 33)])
@pytest.mark.parametrize("padded", [False, True])
def test_every_implementation_matches_float64_reference(implementation, dtype, batch, q_len, kv_len, padded):
    q, k, v = random_qkv(batch, 4, q_len, kv_len, 32, dtype=dtype, seed=batch * 1000 + kv_len)
    mask = None
    if padded:  # left padding of a different length per row; row 0 keeps every key
        mask = torch.ones(batch, kv_len, dtype=torch.bool)
        for row in range(1, batch):
            mask[row, : min(kv_len - 1, 5 * row)] = False
    with torch.no_grad():
        out = attention(q, k, v, causal=True, key_padding_mask=mask, implementation=implementation)
    reference = reference_attention(q, k, v, causal=True, key_padding_mask=mask)
    # bf16: the inputs are exact bf16 values; the fp32-accumulated result is rounded once to bf16 (2^-8)
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference, **tolerance)


@pytest.mark.parametrize("batch", [1, 3])
def test_single_query_gradients_match_reference(batch):
    """Decoding shapes under autograd (e.g. scoring the last token): gradients flow through the CPU path too."""
    q, k, v = random_qkv(batch, 2, 1, 50, 16, seed=7)
    out = attention(q, k, v, causal=True, implementation="sdpa")
    reference = reference_attention(q, k, v, causal=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(reference, (q, k, v), grad.double())
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4)


def test_fully_padded_row_gives_zeros_for_a_single_query():
    q, k, v = random_qkv(2, 2, 1, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = attention(q, k, v, causal=True, key_padding_mask=mask, implementation="sdpa")
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("implementation", (*IMPLEMENTATIONS, "triton"))
@pytest.mark.parametrize("q_len, kv_len, padded", [(10, 8, False), (70, 5, False), (12, 12, True), (9, 4, True)])
def test_causal_queries_before_every_key_give_zeros_in_every_implementation(implementation, q_len, kv_len, padded):
    """Reference: float64 softmax attention with bottom-right causal alignment — with q_len > kv_len the first
    q_len - kv_len queries sit before every key and see none: zeros and zero gradients, never an error or NaN
    (the same semantics as flash-attn). Outputs and gradients of q, k, v against the reference."""
    if implementation == "triton":
        pytest.importorskip("triton", reason="Triton is not installed")
        from flash_experts.attention.flash_triton import is_triton_available

        if not is_triton_available():
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 set before import")
    q, k, v = random_qkv(2, 2, q_len, kv_len, 16, seed=q_len * 100 + kv_len)
    mask = None
    if padded:
        mask = torch.ones(2, kv_len, dtype=torch.bool)
        mask[1, :2] = False
    out = attention(q, k, v, causal=True, key_padding_mask=mask, implementation=implementation)
    reference = reference_attention(q, k, v, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=1e-4)
    blind = max(0, q_len - kv_len)
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(reference, (q, k, v), grad.double())
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4)
