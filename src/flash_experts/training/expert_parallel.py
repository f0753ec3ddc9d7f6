"""Training with expert parallelism: `run.expert_parallel=N` under torchrun, composed with data parallelism.

    torchrun --nproc_per_node=4 -m flash_experts.cli.main finetune --config C run.expert_parallel=2

The layer's side (the exchange of rows between the processes that hold the experts) is model/expert_parallel.py.
This module lays the processes out and keeps the training arithmetic that of the data-parallel run it replaces:

- Layout (torchtitan's: expert parallelism borrows from the data-parallel processes): W processes, every one
  with its own batch (data parallel over all W, as without expert parallelism). Consecutive blocks of N
  processes form an *expert group* that splits each MoE layer's E experts (E/N each); the W/N processes that
  hold the same experts (the same position in their blocks) form a *replica group*.
- Gradients: everything but the experts is replicated on all W processes and DDP averages its gradients over
  W, as before (the experts are parameters DDP is told to ignore). An expert's local gradient already sums the
  contributions of every process of its expert group (the exchange is differentiable); summed over its replica
  group and divided by W it is exactly the data-parallel run's average.
- Clipping sees the whole model's gradient norm: the replicated part once, plus the experts' squares summed
  over the expert group.
- The balancing losses see each process's own tokens, as under data parallelism (model/expert_parallel.py).
- Checkpoints hold one process's layout (every expert whole, the optimizer's moments too), so a run saved at
  N loads at any degree, in one process, and in transformers' `from_pretrained`; a resume slices them.
- Evaluation: each process scores its own validation windows; one with fewer batches runs forwards it does not
  count, so that every process takes part in every exchange.

Every check runs on every process before any collective, so a bad setting is one error line (exit 2) on each
process, never a hang.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flash_experts.errors import ConfigError
from flash_experts.model.expert_parallel import (
    AllToAllExperts,
    check_expert_parallel_degree,
    shard_experts,
    whole_experts_state_dict,
)
from flash_experts.model.routing import moe_layers_of
from flash_experts.training.distributed import average_over, broadcast_from_first


def check_expert_parallel_run(model: nn.Module, degree: int, world_size: int, parallel: str) -> None:
    """Every refusal, from what each process knows alone (no collective): the same answer on every process."""
    if degree == 1:
        return
    if parallel != "ddp":
        raise ConfigError(f"run.expert_parallel={degree} composes with run.parallel=ddp (the experts are split "
                          f"over processes, everything else replicated); run.parallel={parallel} is not supported "
                          "with it")
    layers = moe_layers_of(model)
    if not layers:
        raise ConfigError(f"run.expert_parallel={degree} needs a Mixture-of-Experts model; this one has no MoE "
                          "layer (set a moe section, or run.expert_parallel=1)")
    try:
        check_expert_parallel_degree(layers[0].num_experts, degree, world_size)
    except ConfigError as error:
        raise ConfigError(f"run.expert_parallel={degree}: {error}") from None


class ExpertParallelTraining:
    """The experts of `model` split over expert groups of `degree` processes (module docstring). Build it on
    every process, after loading the weights and before building the optimizer and DDP."""

    def __init__(self, model: nn.Module, layout: Any) -> None:
        """`layout`: the run's processes (training/processes.py ProcessLayout)."""
        self.degree, self.world_size, rank = layout.expert_parallel, layout.world, layout.rank
        expert_groups, replica_groups = layout.expert_groups(), layout.replica_groups()
        # new_group is a collective over the world: every process creates every group, in the same order.
        for ranks in expert_groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                self.expert_group = group
        for ranks in replica_groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                self.replica_group = group
        broadcast_from_first(model)  # the experts are cut from identical whole weights
        shard_experts(model, self.expert_group)
        # (name, parameter, its layer's dispatch) of every sharded expert weight, in the model's order
        self.experts: list[tuple[str, nn.Parameter, AllToAllExperts]] = []
        for prefix, module in model.named_modules():
            dispatch = getattr(module, "expert_dispatch", None)
            if dispatch is not None and not dispatch.local:
                for name, parameter in module.experts.named_parameters(recurse=False):
                    self.experts.append((f"{prefix}.experts.{name}", parameter, dispatch))
        self._expert_ids = {id(parameter) for _, parameter, _ in self.experts}

    def is_expert(self, parameter: Tensor) -> bool:
        return id(parameter) in self._expert_ids

    def ignored_by_data_parallel(self) -> list[str]:
        """The parameter names DDP must leave alone: the experts, reduced by `reduce_expert_gradients`."""
        return [name for name, _, _ in self.experts]

    def reduce_expert_gradients(self) -> None:
        """Each expert's gradient summed over its replica group and divided by the world size: the average the
        data-parallel run takes (module docstring). Call after the last micro-batch's backward."""
        average_over([parameter for _, parameter, _ in self.experts], self.replica_group)

    def gradient_norm(self, params: list[nn.Parameter]) -> Tensor:
        """The whole model's gradient norm: the replicated parameters' squares here, plus the experts' summed
        over the expert group (each process holds E/N experts of each layer)."""
        replicated = [p.grad.double() for p in params if p.grad is not None and not self.is_expert(p)]
        experts = [p.grad.double() for p in params if p.grad is not None and self.is_expert(p)]
        squares = torch.zeros(2, dtype=torch.float64, device=params[0].device)
        if replicated:
            squares[0] = sum(g.pow(2).sum() for g in replicated)
        if experts:
            squares[1] = sum(g.pow(2).sum() for g in experts)
        expert_squares = squares[1:].clone()
        dist.all_reduce(expert_squares, op=dist.ReduceOp.SUM, group=self.expert_group)
        return (squares[0] + expert_squares[0]).sqrt().to(params[0].dtype)

    def whole_model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights with every expert whole (a collective over each expert group)."""
        return whole_experts_state_dict(model)

    def whole_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`optimizer.state_dict()` in one process's layout: every expert's moments gathered whole (a
        collective: every process calls it)."""
        state = optimizer.state_dict()
        for index, parameter in enumerate(_optimizer_parameters(optimizer)):
            dispatch = self._dispatch_of(parameter)
            if dispatch is None or index not in state["state"]:
                continue
            # state_dict() hands out the optimizer's own per-parameter dicts: fill a copy
            state["state"][index] = dict(state["state"][index])
            for key, value in list(state["state"][index].items()):
                if torch.is_tensor(value) and value.shape == parameter.shape:
                    parts = [torch.empty_like(value) for _ in range(dispatch.size)]
                    dist.all_gather(parts, value.contiguous(), group=dispatch.group)
                    state["state"][index][key] = torch.cat(parts)
        return state

    def load_whole_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a state in one process's layout (`whole_optimizer_state`, or a run without expert parallelism):
        each expert's moments sliced to this process's experts."""
        state = {"state": {int(k): dict(v) for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
        for index, parameter in enumerate(_optimizer_parameters(optimizer)):
            dispatch = self._dispatch_of(parameter)
            if dispatch is None or index not in state["state"]:
                continue
            kept = slice(dispatch.first_expert, dispatch.first_expert + dispatch.local_experts)
            for key, value in state["state"][index].items():
                if torch.is_tensor(value) and value.ndim == parameter.ndim and value.shape[1:] == parameter.shape[1:]:
                    if value.shape[0] != dispatch.num_experts:
                        raise ConfigError(f"the checkpoint's optimizer state holds {value.shape[0]} experts for a "
                                          f"layer of {dispatch.num_experts}")
                    state["state"][index][key] = value[kept].clone()
        optimizer.load_state_dict(state)

    def _dispatch_of(self, parameter: Tensor) -> AllToAllExperts | None:
        for _, expert, dispatch in self.experts:
            if expert is parameter:
                return dispatch
        return None

    def forwards_for_every_exchange(self, model: nn.Module, own_batches: int, batch: Tensor,
                                    autocast: Any) -> None:
        """Run the forwards (not counted) that a process with fewer validation batches than another owes to
        the exchanges the others run: each MoE layer's exchange needs every process of its group."""
        counts = torch.tensor([own_batches], dtype=torch.int64, device=batch.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for _ in range(int(counts) - own_batches):
                    with autocast():
                        model(input_ids=batch)
        finally:
            model.train(was_training)


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    """The parameters in the order `state_dict()` numbers them."""
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]
