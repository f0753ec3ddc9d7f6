"""Data parallelism from torchrun's environment: process group, DDP wrap or FSDP2 sharding, cross-rank reductions.

Launch with torchrun; there is no home-made launcher:

    torchrun --nproc_per_node=2 -m flash_experts.cli.main finetune --config configs/X.yaml [run.parallel=fsdp]

`run.parallel=ddp` (the default) keeps a whole model, its gradients and AdamW's state on every process;
`run.parallel=fsdp` shards all three (FSDP2, `fully_shard` per transformer block, then the root): each process
holds 1/WORLD_SIZE of them and gathers one block's weights just in time for its forward and backward.

Without torchrun's variables everything here is a cheap no-op for one process, so the trainer has a single
code path. Rank 0 alone writes checkpoints and logs; saves are fenced by barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); `device` is "cpu" or "cuda".

    Each CUDA rank takes the GPU of its LOCAL_RANK. Without torchrun: one process, rank 0.
    """
    if not launched_by_torchrun():
        return DistInfo(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, ignore: list[str] | None = None) -> torch.nn.Module:
    """DistributedDataParallel over `model` (which DDP broadcasts from rank 0 on construction).

    find_unused_parameters stays off: MoE experts are stacked tensors, so an expert that receives no token in
    a step still gets a (zero) gradient, and frozen parameters (train="moe") are not DDP's to reduce.
    `ignore`: parameter names DDP neither broadcasts nor reduces (expert parallelism's experts, which differ
    from process to process and are reduced over their replicas: training/expert_parallel.py).
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [info.local_rank] if info.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def broadcast_from_first(model: torch.nn.Module) -> None:
    """Every process's weights and buffers made rank 0's. Each rank built its own model (random init, expert
    noise, Drop-Upcycling draw from per-rank seeds): rank 0's is the run's, as DDP's constructor makes it; a
    shard (FSDP, expert parallelism) must be cut from identical whole weights."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_over(params: list[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Each gradient of `params` averaged over the world's processes, summed within `group` (None: the world),
    in one flat all-reduce."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size()
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP's units: the blocks a transformers model declares it must not split (`_no_split_modules`: GPT2Block,
    LlamaDecoderLayer; ours and transformers' own dense models alike, as accelerate's FSDP wrapping reads them)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise TypeError(f"{type(model).__name__} declares no blocks to shard (_no_split_modules)")
    return blocks


def shard_fsdp(model: torch.nn.Module, param_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: `fully_shard` each block (one all-gather per block, freed after use), then the root
    (embeddings, final norm, LM head). Parameters become DTensors holding this rank's shard; build the optimizer
    afterwards. `param_dtype` (bf16 / fp16, or None for fp32) is the dtype the gathered weights compute in;
    gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    broadcast_from_first(model)  # shards are cut from identical weights
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returned for chaining); identity for one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def any_rank(flag: bool, device: str) -> bool:
    """True when `flag` is true on any rank (a stop request or a NaN must stop every rank at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (small objects only: RNG states)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
