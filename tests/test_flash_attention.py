"""flash_attention against plain softmax attention (float64, explicit masks) — outputs and gradients.

The reference below is written independently of the implementation: it builds the full score matrix,
applies the causal (bottom-right) and padding masks explicitly and uses torch.softmax.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flash_experts.attention.flash import flash_attention

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_attention(q, k, v, causal, key_padding_mask=None, scale=None):
    """Plain softmax attention in float64 with an explicit (q_len, kv_len) visibility matrix."""
    q, k, v = q.double(), k.double(), v.double()
    q_len, kv_len, head_dim = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    visible = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    if causal:  # query i sits at absolute position kv_len - q_len + i
        query_pos = torch.arange(q_len)[:, None] + (kv_len - q_len)
        visible = visible & (torch.arange(kv_len)[None, :] <= query_pos)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-2, -1)) * scale
    row_has_key = visible.any(dim=-1, keepdim=True)
    # Rows without any visible key: keep scores finite so softmax is defined, then zero them out.
    scores = torch.where(row_has_key, scores.masked_fill(~visible, -math.inf), 0.0)
    probs = torch.softmax(scores, dim=-1) * row_has_key
    return probs @ v


def random_qkv(batch, heads, q_len, kv_len, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype).requires_grad_()
    return make(q_len), make(kv_len), make(kv_len)


def outputs_and_grads(fn, q, k, v, seed=1):
    """Output and (dq, dk, dv) for a fixed random upstream gradient."""
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def assert_matches_reference(q, k, v, causal, key_padding_mask=None, atol=2e-5, rtol=1e-4, **kwargs):
    ours, our_grads = outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, **kwargs),
        q, k, v)
    ref, ref_grads = outputs_and_grads(
        lambda q, k, v: reference_attention(q, k, v, causal, key_padding_mask, kwargs.get("scale")), q, k, v)
    assert ours.dtype == q.dtype and ours.shape == q.shape
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ours, *our_grads), (ref, *ref_grads)):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        assert a.dtype == q.dtype, name
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "q_len, kv_len, head_dim, causal, block_size",
    [
        (1, 1, 64, True, 64),
        (17, 17, 64, True, 64),
        (17, 17, 32, False, 64),
        (100, 100, 32, True, 64),
        (129, 129, 64, True, 64),
        (129, 129, 32, False, 64),
        (100, 129, 64, False, 16),  # q_len < kv_len, not causal, many ragged blocks
        (1, 300, 64, True, 64),  # one new token against a long cache: sees every key
        (1, 300, 32, False, 64),
        (37, 300, 32, True, 64),  # q_len < kv_len: causal diagonal shifted to the bottom right
        (70, 129, 64, True, 32),
        (33, 65, 128, True, 64),
    ],
)
def test_matches_plain_softmax_attention(q_len, kv_len, head_dim, causal, block_size):
    """Reference: plain float64 softmax attention — outputs and dq, dk, dv for odd shapes."""
    q, k, v = random_qkv(2, 3, q_len, kv_len, head_dim)
    assert_matches_reference(q, k, v, causal, block_size=block_size)


def test_custom_scale_matches_plain_softmax_attention():
    """Reference: plain float64 softmax attention with the same explicit scale."""
    q, k, v = random_qkv(1, 2, 40, 40, 32)
    assert_matches_reference(q, k, v, causal=True, scale=0.3, block_size=16)


def test_non_contiguous_inputs_match_plain_softmax_attention():
    """Reference: plain float64 softmax attention on (B, T, H, D) tensors transposed as models do."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 50, 3, 32, generator=gen).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    assert_matches_reference(q, k, v, causal=True, block_size=16)


@pytest.mark.parametrize("causal", [True, False])
def test_left_padding_matches_reference_and_gives_zero_rows(causal):
    """Reference: plain float64 softmax attention with a padding mask; fully masked rows are zeros."""
    q, k, v = random_qkv(3, 2, 75, 75, 32)
    mask = torch.ones(3, 75, dtype=torch.bool)
    mask[1, :10] = False  # left padding
    mask[2, :70] = False  # padding spans the first block and more
    assert_matches_reference(q, k, v, causal, mask, block_size=32)

    out = flash_attention(q, k, v, causal=causal, key_padding_mask=mask, block_size=32)
    out.sum().backward()
    if causal:  # padded query positions see only padding: output and dq are exactly zero
        assert (out[1, :, :10] == 0).all() and (out[2, :, :70] == 0).all()
        assert (q.grad[1, :, :10] == 0).all() and (q.grad[2, :, :70] == 0).all()
    assert (k.grad[1, :, :10] == 0).all() and (v.grad[2, :, :70] == 0).all()  # padded keys get no grad


def test_fully_padded_sequence_gives_zeros_not_nan():
    """Reference: hand-computed — a batch entry with no real token outputs zeros with zero gradients."""
    q, k, v = random_qkv(2, 2, 20, 20, 32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0] = False
    for causal in (True, False):
        out = flash_attention(q, k, v, causal=causal, key_padding_mask=mask)
        q.grad = k.grad = v.grad = None
        out.sum().backward()
        assert (out[0] == 0).all() and torch.isfinite(out).all()
        for grad in (q.grad, k.grad, v.grad):
            assert (grad[0] == 0).all() and torch.isfinite(grad).all()


def test_padding_with_cache_matches_reference():
    """Reference: plain float64 softmax attention — left-padded prompt plus decode steps (q_len < kv_len)."""
    q, k, v = random_qkv(2, 2, 5, 90, 64)
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[0, :30] = False
    assert_matches_reference(q, k, v, causal=True, key_padding_mask=mask)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_matches_reference_within_bf16_tolerance(causal):
    """Reference: float64 softmax attention on the same bf16 values; ours stays bf16 in, bf16 out."""
    q, k, v = random_qkv(2, 2, 100, 129 if not causal else 100, 64, dtype=torch.bfloat16)
    assert_matches_reference(q, k, v, causal, atol=3e-2, rtol=3e-2)


@settings(max_examples=20, deadline=None)
@given(
    q_len=st.integers(1, 70),
    extra_kv=st.integers(0, 40),
    head_dim=st.sampled_from([32, 64]),
    causal=st.booleans(),
    block_size=st.sampled_from([16, 32, 64]),
    pad=st.lists(st.integers(0, 110), min_size=2, max_size=2),
)
def test_random_shapes_and_padding_match_reference(q_len, extra_kv, head_dim, causal, block_size, pad):
    """Reference: plain float64 softmax attention over random shapes, blocks and left padding."""
    kv_len = q_len + extra_kv
    q, k, v = random_qkv(2, 2, q_len, kv_len, head_dim, seed=q_len * 131 + kv_len)
    mask = torch.arange(kv_len)[None, :] >= torch.tensor(pad)[:, None]  # left padding per sequence
    assert_matches_reference(q, k, v, causal, mask, block_size=block_size)


def largest_saved_tensor_numel(fn, q, k, v) -> int:
    """Numel of the largest tensor autograd keeps for backward while running fn(q, k, v)."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(q, k, v)
    return max(sizes)


def test_forward_saves_only_inputs_output_and_logsumexp():
    """Reference: naive softmax attention, which must save a T x T matrix — ours saves none that big."""
    seq = 300
    q, k, v = random_qkv(1, 2, seq, seq, 32)
    naive = largest_saved_tensor_numel(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v)
    assert naive >= seq * seq  # the check can catch a materialised score matrix
    ours = largest_saved_tensor_numel(lambda q, k, v: flash_attention(q, k, v), q, k, v)
    assert ours <= q.numel()  # Q, K, V, O (B*H*T*D) and L (B*H*T) only

    out = flash_attention(q, k, v)
    saved_shapes = sorted(tuple(t.shape) for t in out.grad_fn.saved_tensors if t is not None)
    assert saved_shapes == sorted([tuple(q.shape)] * 4 + [(1, 2, seq)])


_PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from flash_experts.attention.flash import flash_attention
    torch.set_num_threads(1)
    def max_rss_bytes():
        # VmHWM is this process's own peak; ru_maxrss is not, it starts from the forking parent's RSS.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    def fwd_bwd(fn, seq):
        q, k, v = (torch.randn(1, 4, seq, 32, requires_grad=True) for _ in range(3))
        fn(q, k, v).sum().backward()
    naive = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / 32 ** 0.5, dim=-1) @ v
    fn = flash_attention if sys.argv[1] == "ours" else naive
    fwd_bwd(fn, 64)  # warm up allocator, threads, autograd engine
    base = max_rss_bytes()
    fwd_bwd(fn, 2048)
    print(max_rss_bytes() - base)
""")


def _peak_memory_growth(which: str) -> int:
    """Growth of the peak RSS of a fresh process running forward+backward at T=2048 (one process each,
    so neither measurement can hide inside memory the other already touched)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, which], capture_output=True, text=True,
                            timeout=120, check=True)
    return int(result.stdout.split()[-1])


def test_peak_memory_at_2048_far_below_score_matrix():
    """Reference: naive softmax attention in a twin process — its peak grows by >= T^2 floats, ours not."""
    ours_peak, naive_peak = _peak_memory_growth("ours"), _peak_memory_growth("naive")
    score_matrix_bytes = 4 * 2048 * 2048 * 4  # heads * T * T * fp32
    assert naive_peak >= score_matrix_bytes, (ours_peak, naive_peak)  # the measurement sees a materialised matrix
    # Ours holds Q, K, V, O, their gradients and one (block x T) tile: ~10 MB, less than the score matrix
    # of a single head (T x T fp32 = 16 MB), which any implementation that materialises scores must hold.
    assert ours_peak < score_matrix_bytes / 4, (ours_peak, naive_peak)


def test_bad_arguments_raise_value_error():
    """Reference: the contract in docs/ARCHITECTURE.md — shapes and mask shape."""
    q, k, v = random_qkv(1, 2, 10, 8, 32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, k, v, causal=False, key_padding_mask=torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes"):
        flash_attention(q, k[..., :16], v, causal=False)
