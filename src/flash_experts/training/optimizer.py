"""Gradient clipping and the optimizer step, as one step: what the trainer and the step timing both run.

torch's `clip_grad_norm_` reads every gradient once for the global norm and then multiplies every gradient
in memory by the clipping coefficient: a second read and a write of all of them. An optimizer update is
memory-bound on CPU, and an upcycled MoE has several times the dense model's parameters (every expert keeps
its gradient, whether a token reached it or not), so that second pass is a visible share of its step
(BENCHMARKS.md, "Reused expert memory"). The fused AdamW kernel divides each gradient by `grad_scale` as it
reads it (the hook GradScaler uses to unscale fp16 gradients inside the update): the clipping coefficient goes
there instead, and the gradients are read once for the norm and once for the update.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flash_experts.training.config import OptimConfig

# clip_grad_norm_'s guard against a zero norm, kept so that both paths compute the same coefficient
_EPS = 1e-6


def gradient_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (a DTensor under FSDP2), before any clipping."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` can apply the clipping itself: a fused Adam/AdamW/SGD (torch's fused kernels
    take `grad_scale`). A step driven by a GradScaler (fp16) sets `grad_scale` itself: the trainer clips in
    memory there."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"))


def clipped_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], norm: torch.Tensor,
                 max_norm: float) -> None:
    """The optimizer step on gradients clipped to `max_norm` (given `norm`, from `gradient_norm`): the same
    update as `clip_grad_norm_(params, max_norm)` followed by `optimizer.step()`, with the clipping folded
    into the fused update where the optimizer allows it. `max_norm` inf: no clipping."""
    if math.isinf(max_norm):
        optimizer.step()
        return
    if not folds_clipping(optimizer):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        optimizer.step()
        return
    # clip_grad_norm_ multiplies by min(max_norm / (norm + eps), 1); the kernel divides by its inverse
    optimizer.grad_scale = torch.clamp((norm.float() + _EPS) / max_norm, min=1.0)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def build_adamw(groups: list[dict[str, Any]], optim: "OptimConfig", sharded: bool = False) -> torch.optim.AdamW:
    """The AdamW every training loop of the project runs (the trainer, the race): `groups` from
    `optimizer_groups`, rate, betas and eps from the optim config. The fused kernel exists for CUDA and CPU
    (torch >= 2.4): one pass over the parameters instead of a dozen per step, several times faster on CPU;
    FSDP2's sharded parameters (`sharded`) take the foreach one."""
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             **({"foreach": True} if sharded else {"fused": True}))


def set_scheduled_lr(optimizer: torch.optim.Optimizer, position: float, optim: "OptimConfig") -> float:
    """Set every group's rate for schedule position `position` (a step, or a fraction of a budget in steps):
    the schedule's rate (training/schedule.py) times the group's lr_scale. Returns the schedule's rate."""
    from flash_experts.training.schedule import lr_at

    min_lr = optim.min_lr if optim.min_lr is not None else optim.lr / 10
    rate = lr_at(position, lr=optim.lr, min_lr=min_lr, warmup_steps=optim.warmup_steps, max_steps=optim.max_steps,
                 schedule=optim.schedule)
    for group in optimizer.param_groups:
        group["lr"] = rate * group.get("lr_scale", 1.0)
    return rate
