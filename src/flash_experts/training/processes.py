"""The processes of one run, described once (torchtitan's `ParallelDims`): how many, this one's rank, the
expert-parallel degree, the groups that follow from them, and what synchronises a model's gradients there.

    layout = ProcessLayout(rank, world, expert_parallel=2)   # under torchrun; ProcessLayout() in one process

Data parallelism spans every process (each has its own batch share); expert parallelism borrows from it:
consecutive blocks of `expert_parallel` processes split each MoE layer's experts (an *expert group*), and the
processes at the same position of every block hold the same experts (a *replica group*). The trainer and the
race both read it: the trainer for DDP / FSDP2 / expert parallelism, the race for its twins' hand-averaged
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flash_experts.errors import ConfigError
from flash_experts.training.gradient_sync import (
    AveragedGradients,
    DDPGradients,
    ExpertParallelGradients,
    FSDPGradients,
    GradientSync,
    LocalGradients,
)


@dataclass(frozen=True)
class ProcessLayout:
    rank: int = 0
    world: int = 1
    expert_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        """Processes that each take their own share of every batch: all of them (expert parallelism borrows)."""
        return self.world

    def expert_groups(self) -> list[list[int]]:
        """The ranks of each expert group: consecutive blocks of `expert_parallel`."""
        degree = self.expert_parallel
        return [[block * degree + position for position in range(degree)] for block in range(self.world // degree)]

    def replica_groups(self) -> list[list[int]]:
        """The ranks that hold the same experts: the same position of every block."""
        degree = self.expert_parallel
        return [[block * degree + position for block in range(self.world // degree)] for position in range(degree)]

    def check(self, num_experts: int | None, batch_size: int | None = None) -> None:
        """The refusals each process makes alone (no collective): the same error line on every one."""
        if self.expert_parallel > 1:
            if num_experts is None:
                raise ConfigError(f"expert parallelism of {self.expert_parallel} needs a Mixture-of-Experts model")
            from flash_experts.model.expert_parallel import check_expert_parallel_degree

            check_expert_parallel_degree(num_experts, self.expert_parallel, self.world)
        if batch_size is not None and batch_size % self.world:
            raise ConfigError(f"the batch of {batch_size} windows does not split over {self.world} processes")

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a step's batch (consecutive rows, so the processes cover it exactly)."""
        per = len(batch) // self.world
        return batch[self.rank * per:(self.rank + 1) * per]

    def split_experts(self, model: nn.Module) -> Any:
        """The model's experts split over this process's expert group (training/expert_parallel.py), on every
        process, after the weights are loaded and before the optimizer; None where nothing is split."""
        if self.world == 1 or self.expert_parallel == 1:
            return None
        from flash_experts.training.expert_parallel import ExpertParallelTraining

        return ExpertParallelTraining(model, self)

    def gradient_sync(self, model: nn.Module, *, wrapped: nn.Module | None = None, fsdp: bool = False,
                      experts: Any = None) -> GradientSync:
        """What synchronises `model`'s gradients here (gradient_sync.py): nothing in one process; FSDP2's
        sharding (`fsdp`); expert parallelism (`experts`, from split_experts) with DDP's hooks on `wrapped` or,
        without a wrapper, by hand; DDP (`wrapped`); else averaged by hand (a loop of its own: the race)."""
        if self.world == 1:
            return LocalGradients()
        if fsdp:
            return FSDPGradients(wrapped or model)
        if experts is not None:
            return ExpertParallelGradients(experts, wrapped)
        if wrapped is not None:
            return DDPGradients(wrapped)
        return AveragedGradients(model)
