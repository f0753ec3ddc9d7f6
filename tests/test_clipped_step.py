"""training/optimizer.py: the clipping folded into the fused AdamW update.

Reference: torch's own `clip_grad_norm_` followed by the for-loop (neither fused nor foreach) AdamW, in
float64, on the same parameters and gradients, over several steps."""

import math

import pytest
import torch

from flash_experts.training.optimizer import clipped_step, folds_clipping, gradient_norm


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 6)]  # a matrix, a bias, an expert stack
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes]


# eps 0.1 (not 1e-8) makes Adam's update depend on the gradients' scale, so that a clipping wrongly applied
# moves the weights by far more than the tolerance below
def _run(fused: bool, grad_scale: float, max_norm: float, steps: int = 4) -> tuple[list[torch.Tensor], list[float]]:
    params = _parameters(0)
    optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:],
                                   "weight_decay": 0.0}], lr=1e-2, eps=0.1, **({"fused": True} if fused else {"foreach": False}))
    generator = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        for p in params:
            p.grad = grad_scale * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if fused:
            norm = gradient_norm(params)
            clipped_step(optimizer, params, norm, max_norm)
        else:  # the reference
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
        norms.append(float(norm))
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], norms


@pytest.mark.parametrize("grad_scale, max_norm", [(10.0, 1.0), (0.01, 1.0), (10.0, math.inf)],
                         ids=["clipped", "below-the-limit", "no-limit"])
def test_folded_clipping_equals_clip_grad_norm_then_adamw(grad_scale, max_norm):
    folded, folded_norms = _run(True, grad_scale, max_norm)
    reference, reference_norms = _run(False, grad_scale, max_norm)
    assert folded_norms == pytest.approx(reference_norms, rel=1e-12)  # the norm before clipping, as torch's
    for ours, ref in zip(folded, reference):  # the kernel takes the clipping scale in float32: 1e-7 relative
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-7)
    # the clipping moved the weights: without it the update differs (guards against a test that cannot fail)
    if grad_scale > 1 and max_norm < math.inf:
        unclipped, _ = _run(False, grad_scale, math.inf)
        assert max((a - b).abs().max() for a, b in zip(unclipped, reference)) > 1e-3


def test_only_fused_optimizers_fold_and_the_attribute_is_left_unset():
    params = _parameters(0)
    assert folds_clipping(torch.optim.AdamW(params, fused=True))
    assert not folds_clipping(torch.optim.AdamW(params, foreach=True))
    assert not folds_clipping(torch.optim.SGD(params, lr=0.1))
    optimizer = torch.optim.AdamW(params, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    clipped_step(optimizer, params, gradient_norm(params), 1.0)
    assert not hasattr(optimizer, "grad_scale")  # a later GradScaler or plain step must not see a stale scale


def test_foreach_optimizer_clips_in_memory_as_torch_does():
    params, reference = _parameters(0), _parameters(0)
    for a, b in zip(params, reference):
        a.grad = 10 * torch.ones_like(a)
        b.grad = 10 * torch.ones_like(b)
    clipped_step(torch.optim.AdamW(params, foreach=True), params, gradient_norm(params), 1.0)
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.optim.AdamW(reference, foreach=True).step()
    for a, b in zip(params, reference):
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(a.detach(), b.detach())
