"""Reused weight-sized memory in the MoE layer's training step (model/buffers.py).

Reference for every test: the same layer with its buffers removed (each step allocates fresh memory, the
path the loop reference in test_moe_layer.py holds to per-token math), fed the same inputs. Reuse must never
change a number: not across steps, not when gradients accumulate over two backward passes, not when two
graphs are alive at once, not when a caller keeps a gradient.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from flash_experts.model.buffers import ReusableBuffer, _held_elsewhere
from flash_experts.model.moe import MoELayer, MoESettings


def make_pair(gated: bool, seed: int = 0) -> tuple[MoELayer, MoELayer]:
    """(layer with reused buffers, the same layer allocating fresh memory every step)."""
    torch.manual_seed(seed)
    layer = MoELayer(MoESettings(num_experts=4, num_experts_per_tok=2), hidden_size=16, ffn_size=24,
                     activation=F.silu if gated else (lambda x: F.gelu(x, approximate="tanh")),
                     gated=gated, bias=not gated, layer_index=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.5)
    layer.experts.backend = "loop"
    fresh = copy.deepcopy(layer)
    fresh.experts.weight_buffers = {}
    return layer, fresh


def batch(seed: int) -> torch.Tensor:
    return torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(seed))


def loss_of(layer: MoELayer, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, _ = layer(x)
    return out.float().square().mean()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_training_steps_with_reused_memory_equal_fresh_memory(gated, bf16):
    """Three AdamW steps (fused, which updates weights without bumping their version counter): the weights
    after each step equal the fresh-memory layer's exactly, and the gradient memory really is reused."""
    layer, fresh = make_pair(gated)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (layer, fresh)]
    grad_pointers = []
    for step in range(3):
        for model, optimizer in zip((layer, fresh), optimizers):
            loss_of(model, batch(step), bf16).backward()
            if model is layer:
                grad_pointers.append(model.experts.w_up.grad.data_ptr())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (name, p), q in zip(layer.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), (step, name)
    assert grad_pointers[1] == grad_pointers[2]  # the optimizer let go of it, so the next step reused it


@pytest.mark.parametrize("bf16", [False, True])
def test_gradients_accumulated_over_two_backward_passes(bf16):
    """Gradient accumulation: the first pass's gradient is still held as .grad when the second runs, so the
    second must not write into it; .grad ends as the sum, equal to the fresh-memory layer's."""
    layer, fresh = make_pair(gated=False)
    for model in (layer, fresh):
        loss_of(model, batch(1), bf16).backward()
        loss_of(model, batch(2), bf16).backward()
    for (name, p), q in zip(layer.named_parameters(), fresh.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_two_live_graphs_keep_their_own_weight_copies():
    """Two forwards before either backward (bf16: both graphs saved a bf16 copy of the weights), with the
    weights changed in between: each backward must see the weights of its own forward."""
    layer, fresh = make_pair(gated=True)
    grads = {}
    for name, model in (("reused", layer), ("fresh", fresh)):
        first = loss_of(model, batch(1), bf16=True)
        with torch.no_grad():
            for p in model.experts.parameters():
                p.data.mul_(1.5)  # through .data: autograd's version check does not see this
        second = loss_of(model, batch(2), bf16=True)
        grads[name] = [g.clone() for g in torch.autograd.grad(first + second, list(model.parameters()))]
    for a, b in zip(grads["reused"], grads["fresh"]):
        assert torch.equal(a, b)


def test_a_gradient_the_caller_keeps_is_never_overwritten():
    layer, _ = make_pair(gated=False)
    kept = torch.autograd.grad(loss_of(layer, batch(1), bf16=True), [layer.experts.w_up])[0]
    snapshot = kept.clone()
    torch.autograd.grad(loss_of(layer, batch(2), bf16=True), [layer.experts.w_up])
    assert torch.equal(kept, snapshot)


def test_held_elsewhere_sees_views_and_second_references():
    """Reference: what holds the memory, stated by construction."""
    buffer = ReusableBuffer()
    first = buffer.take((4, 3), torch.float32, torch.device("cpu"))
    assert not _held_elsewhere(first)
    assert buffer.take((4, 3), torch.float32, torch.device("cpu")) is first  # free: reused
    view = first.view(12)
    assert _held_elsewhere(first)
    second = buffer.take((4, 3), torch.float32, torch.device("cpu"))
    assert second.data_ptr() != view.data_ptr()  # held by the view: new memory
    del view
    assert buffer.take((4, 3), torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16  # new dtype: new


def test_buffers_are_not_model_state():
    layer, _ = make_pair(gated=False)
    loss_of(layer, batch(1), bf16=True).backward()
    assert not any("buffer" in key for key in layer.state_dict())
    assert layer.experts.weight_buffers["w_up"].gradient._tensor is not None  # the step used them
    # (the layer itself does not pickle: its activation is a lambda; its buffers must)
    for buffers in (copy.deepcopy(layer).experts.weight_buffers, pickle.loads(pickle.dumps(layer.experts.weight_buffers))):
        assert all(b.compute_copy._tensor is None and b.gradient._tensor is None for b in buffers.values())
