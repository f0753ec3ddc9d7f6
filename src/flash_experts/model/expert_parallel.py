"""Expert parallelism: a MoE layer's experts spread over the processes of a group, tokens sent to them and back.

One process holds every expert (`moe.LocalExperts`). With expert parallelism over a group of N processes, each
holds E/N of them (process r: experts r*E/N ... (r+1)*E/N - 1) and every process routes its own tokens as
before. Then, per MoE layer (the pattern of torchtitan's `AllToAllTokenDispatcher` and megablocks'
`parallel_forward_once`):

1. The layer sorts its assignments by expert, as in one process (a capacity limit drops assignments here, on
   the process's own tokens, exactly as one process given those tokens would).
2. The per-expert row counts are exchanged (`all_to_all_single` of E integers): each process learns how many
   rows every other process sends to each of its experts, and reads the split sizes on the host.
3. The rows are exchanged (`all_to_all_single` with uneven splits): process r sends process s the rows for
   s's experts. They arrive source-major (all of process 0's rows, then process 1's, ...), are permuted
   expert-major, and go through the local experts: the same grouped products as in one process.
4. The outputs are permuted back and returned by the reverse exchange, then combined by the layer with the
   router's weights, as in one process.

Both exchanges are differentiable (an all-to-all's gradient is the all-to-all with the splits swapped), so an
expert's weight gradient sums its rows' contributions from every process, and each process's inputs get
their gradient back. Dropless: an expert takes whatever it is sent. This class is the only difference from
one process: the layer's router, experts' products and combine are shared.

What each process's balancing loss sees: its own tokens' counts and probabilities, as under data parallelism
without expert parallelism (and as the Switch Transformer computes it per core), so a run with expert
parallelism trains the same model as the data-parallel run it replaces.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flash_experts.errors import ConfigError
from flash_experts.model.routing import moe_layers_of


@dataclass
class ExchangeLedger:
    """What the exchanges of one dispatcher cost, counted as they happen (benchmarks read and reset it)."""

    rows_sent: int = 0  # rows sent to other processes (the forward's two exchanges and the backward's two)
    bytes_sent: int = 0  # those rows' bytes, plus the counts' (E int64 each forward, to the others)
    exchanges: int = 0  # all-to-all calls (counts, rows and their gradients)
    seconds: float = 0.0  # wall time inside the row exchanges (gloo: host copies included)

    def reset(self) -> None:
        self.rows_sent = self.bytes_sent = self.exchanges = 0
        self.seconds = 0.0


class _Exchange(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable: the gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup,
                ledger: ExchangeLedger) -> Tensor:
        ctx.splits, ctx.group, ctx.ledger = (output_splits, input_splits), group, ledger
        return _exchange(x_ND, output_splits, input_splits, group, ledger)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        output_splits, input_splits = ctx.splits
        grad_ND = _exchange(grad_MD.contiguous(), input_splits, output_splits, ctx.group, ctx.ledger)
        return grad_ND, None, None, None, None


def _exchange(x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup,
              ledger: ExchangeLedger) -> Tensor:
    out_MD = x_ND.new_empty(sum(output_splits), *x_ND.shape[1:])
    start = time.perf_counter()
    dist.all_to_all_single(out_MD, x_ND.contiguous(), output_splits, input_splits, group=group)
    ledger.seconds += time.perf_counter() - start
    rank = dist.get_rank(group)
    rows_out = sum(input_splits) - input_splits[rank]
    ledger.rows_sent += rows_out
    ledger.bytes_sent += rows_out * math.prod(x_ND.shape[1:]) * x_ND.element_size()
    ledger.exchanges += 1
    return out_MD


def exchange(x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup,
             ledger: ExchangeLedger) -> Tensor:
    """Rows of x (input_splits[s] of them for process s, in process order) sent; output_splits[s] received from
    each s. Differentiable."""
    return _Exchange.apply(x_ND, output_splits, input_splits, group, ledger)


def expert_major_order(counts_SE: Tensor) -> Tensor:
    """Rows laid out source-major (source s's rows for expert 0, then its expert 1, ..., then source s+1's),
    `counts_SE[s, e]` of each: the indices that lay them out expert-major (expert e's rows from source 0, then
    source 1, ...), keeping each block's own order."""
    S, E = counts_SE.shape
    flat = counts_SE.reshape(-1)
    starts_SE = (torch.cumsum(flat, 0) - flat).reshape(S, E)
    counts_ES, starts_ES = counts_SE.t().reshape(-1), starts_SE.t().reshape(-1)
    total = int(flat.sum())
    block_start = torch.repeat_interleave(starts_ES, counts_ES, output_size=total)
    position_in_block = (torch.arange(total, device=counts_SE.device)
                         - torch.repeat_interleave(torch.cumsum(counts_ES, 0) - counts_ES, counts_ES, output_size=total))
    return block_start + position_in_block


class AllToAllExperts:
    """The experts of a layer spread over `group`: this process holds experts [first, first + local) of
    `num_experts`, and each forward exchanges rows with the others (module docstring)."""

    local = False

    def __init__(self, group: dist.ProcessGroup | None, num_experts: int):
        self.group = group if group is not None else dist.group.WORLD
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        check_expert_parallel_degree(num_experts, self.size)
        self.num_experts, self.local_experts = num_experts, num_experts // self.size
        self.first_expert = self.rank * self.local_experts
        self.ledger = ExchangeLedger()
        self.exchange = exchange  # the differentiable exchange (a test swaps in one without a gradient)

    def __call__(self, experts: nn.Module, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """x_ND: this process's kept assignments' rows, sorted by (global) expert, `counts_E` rows each. Returns
        the experts' outputs for those rows in the same order, wherever the experts are."""
        S, L = self.size, self.local_experts
        # (2) the counts: what each process sends to each of our experts
        counts_E = counts_E.to(torch.int64).contiguous()
        received_SL = torch.empty(S * L, dtype=torch.int64, device=counts_E.device)
        dist.all_to_all_single(received_SL, counts_E, group=self.group)
        received_SL = received_SL.reshape(S, L)
        self.ledger.bytes_sent += (S - 1) * L * counts_E.element_size()
        self.ledger.exchanges += 1
        # One host read for both splits (the exchange needs them as Python ints, as torchtitan's does).
        send_rows, recv_rows = torch.stack([counts_E.reshape(S, L).sum(1), received_SL.sum(1)]).tolist()
        # (3) the rows, to the experts' processes; source-major -> expert-major; the local experts
        x_MD = self.exchange(x_ND, recv_rows, send_rows, self.group, self.ledger)
        order_M = expert_major_order(received_SL.to(x_MD.device))
        y_MD = experts(x_MD.index_select(0, order_M), received_SL.sum(0))
        # (4) back to source-major, back to the sources
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        return self.exchange(y_MD.index_select(0, inverse_M), send_rows, recv_rows, self.group, self.ledger)


def check_expert_parallel_degree(num_experts: int, degree: int, world_size: int | None = None) -> None:
    """The degree must divide the experts (each process holds as many) and, in training, the processes."""
    if degree < 1:
        raise ConfigError(f"expert parallelism's degree must be >= 1, got {degree}")
    if num_experts % degree:
        raise ConfigError(f"expert parallelism over {degree} processes needs a number of experts divisible by "
                          f"{degree}; the model has {num_experts}")
    if world_size is not None and world_size % degree:
        raise ConfigError(f"expert parallelism over {degree} processes needs a number of processes divisible "
                          f"by {degree}; there are {world_size}")


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """In place: every MoE layer of `model` keeps only this process's experts of `group` (a slice of each
    stacked weight, as new parameters: build the optimizer afterwards) and exchanges rows with the others.
    Every process must hold the same whole weights before (loaded, or broadcast from one)."""
    from flash_experts.model.moe import GroupedExperts

    layers = moe_layers_of(model)
    if not layers:
        raise ConfigError("expert parallelism needs a Mixture-of-Experts model; this one has no MoE layer")
    for layer in layers:
        if not isinstance(layer.experts, GroupedExperts):
            raise ConfigError("expert parallelism trains float experts; this model's experts are quantized")
        dispatch = AllToAllExperts(group, layer.num_experts)
        kept = slice(dispatch.first_expert, dispatch.first_expert + dispatch.local_experts)
        experts = layer.experts
        for name, parameter in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(parameter.detach()[kept].clone(),
                                                requires_grad=parameter.requires_grad))
        experts.num_experts = dispatch.local_experts
        layer.expert_dispatch = dispatch


def whole_experts_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with every sharded expert weight gathered whole (E experts, in order), so a
    checkpoint written at any degree has the layout of one process. A collective: every process calls it."""
    state = model.state_dict()
    for prefix, layer in model.named_modules():
        dispatch = getattr(layer, "expert_dispatch", None)  # an MoE layer's
        if dispatch is None or dispatch.local:
            continue
        for name, parameter in layer.experts.named_parameters(recurse=False):
            parts = [torch.empty_like(parameter) for _ in range(dispatch.size)]
            dist.all_gather(parts, parameter.detach().contiguous(), group=dispatch.group)
            state[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = torch.cat(parts)
    return state
