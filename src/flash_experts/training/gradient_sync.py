"""How one step's gradients become the run's: a protocol, one implementation per strategy.

The training step (steps.py `optimizer_step`) is the same for the trainer and the race; what differs between
one process, DDP, FSDP2, expert parallelism and the race's hand-averaged data parallelism is only this:

- `accumulating(last)`: the context a micro-batch's forward and backward run in (DDP and FSDP2 skip their
  gradient reduction on every micro-batch but the last: one reduction per step, not per micro-batch);
- `reduce(params)`: what is left to reduce after the last backward (the experts over their replicas; every
  gradient, for a loop without DDP's hooks);
- `norm(params)`: the whole model's gradient norm clipping reads (a DTensor under FSDP2, which clipping multiplies
  the sharded gradients by; the experts' squares summed over their expert group).

`ProcessLayout` (training/processes.py) says which one a run needs (`gradient_sync`).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol

from torch import Tensor, nn

from flash_experts.training.distributed import average_over, broadcast_from_first
from flash_experts.training.optimizer import gradient_norm


class GradientSync(Protocol):
    def accumulating(self, last: bool) -> ContextManager[Any]:
        """Around one micro-batch's forward and backward; `last`: the step's last micro-batch."""

    def reduce(self, params: list[nn.Parameter]) -> None:
        """After the last backward: the gradients made the run's (averaged over the processes that share them)."""

    def norm(self, params: list[nn.Parameter]) -> Tensor:
        """The whole model's gradient norm, equal on every process."""


class LocalGradients:
    """One process: nothing to synchronise."""

    def accumulating(self, last: bool) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def reduce(self, params: list[nn.Parameter]) -> None:
        pass

    def norm(self, params: list[nn.Parameter]) -> Tensor:
        return gradient_norm(params)


class DDPGradients(LocalGradients):
    """DistributedDataParallel: its hooks average every gradient during the last micro-batch's backward."""

    def __init__(self, ddp_model: nn.Module) -> None:
        self.model = ddp_model

    def accumulating(self, last: bool) -> ContextManager[Any]:
        return contextlib.nullcontext() if last else self.model.no_sync()


class FSDPGradients(LocalGradients):
    """FSDP2: gradients reduce-scattered after the last micro-batch's backward; the norm is a DTensor (clipping
    multiplies the sharded gradients by it; its float is `full_tensor()`'s)."""

    def __init__(self, sharded_model: nn.Module) -> None:
        self.model = sharded_model

    def accumulating(self, last: bool) -> ContextManager[Any]:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


class AveragedGradients(LocalGradients):
    """Data parallelism by hand, for a loop that steps a model itself (the race): the weights broadcast from
    rank 0 once, then after the backward every gradient averaged over the processes in one flat bucket (what
    DDP's reducer computes, without its hooks)."""

    def __init__(self, model: nn.Module) -> None:
        broadcast_from_first(model)

    def reduce(self, params: list[nn.Parameter]) -> None:
        average_over(params, None)


class ExpertParallelGradients(LocalGradients):
    """Expert parallelism (training/expert_parallel.py): the experts' gradients summed over their replica group;
    everything else averaged over every process, by DDP's hooks (`ddp_model`) or by hand (None: the race); the
    norm sums the experts' squares over their expert group."""

    def __init__(self, experts: Any, ddp_model: nn.Module | None = None) -> None:
        self.experts, self.model = experts, ddp_model  # experts: ExpertParallelTraining

    def accumulating(self, last: bool) -> ContextManager[Any]:
        return contextlib.nullcontext() if last or self.model is None else self.model.no_sync()

    def reduce(self, params: list[nn.Parameter]) -> None:
        if self.model is None:
            average_over([p for p in params if not self.experts.is_expert(p)], None)
        self.experts.reduce_expert_gradients()

    def norm(self, params: list[nn.Parameter]) -> Tensor:
        return self.experts.gradient_norm(params)
