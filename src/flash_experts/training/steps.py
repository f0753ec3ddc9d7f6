"""The one training step, and step times measured side by side.

`optimizer_step` is the step (forward, loss, backward, gradient synchronisation, clipping, the optimizer update)
of the trainer and of the race's twins alike; `training_step` is it on one batch, for a model and optimizer
built anywhere (the race, the benchmarks). `interleaved_medians` and
`measure_step_seconds` time several steps taking turns (round r times one step of each): a shared machine's
speed drifts over minutes, and turns expose every contender to the same drift, so the ratios hold even when the
absolute times move. They measure; a contest's budget is FLOPs (flash_experts/contest/budget.py), never seconds.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from flash_experts.training.config import TrainConfig, resolve_device, resolve_precision
from flash_experts.training.distributed import all_reduce_mean
from flash_experts.training.gradient_sync import GradientSync, LocalGradients
from flash_experts.training.optimizer import clipped_step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        device: str = "cpu", on_round: Callable[[int], None] | None = None) -> dict[str, float]:
    """Median seconds of each call, the contenders taking turns (round r runs every call once), after
    `warmup` untimed calls of each (allocator, thread pool, kernels)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        for name, fn in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(round_index)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class StepNumbers:
    """What one optimizer step measured: the objective, the LM loss and the router losses (means over the
    micro-batches and the processes), the gradient norm before clipping, each MoE layer's tokens per expert."""

    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float
    expert_counts: dict[int, torch.Tensor]


class NonFiniteStep(FloatingPointError):
    """The loss or the gradient norm is not finite: the step stopped before the optimizer moved any weight."""


def optimizer_step(model: torch.nn.Module, micro_batches: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                   params: list[torch.nn.Parameter], sync: GradientSync | None = None, *,
                   autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext, clip: float = 1.0,
                   scaler: torch.amp.GradScaler | None = None) -> StepNumbers:
    """The one training step of the trainer and the race: each micro-batch's forward (labels = inputs) and
    backward of loss / micro-batches, the gradients synchronised (`sync`, gradient_sync.py; None: one process),
    the norm, clipping to `clip` (inf: none) and the update (driven by `scaler` under fp16), gradients cleared.
    Raises NonFiniteStep, before the update, on a non-finite loss or (without a scaler, which skips such steps
    itself) gradient norm. Works for any causal LM taking `labels` (ours and HF's)."""
    sync = sync or LocalGradients()
    scaling = scaler is not None and scaler.is_enabled()
    count = len(micro_batches)
    sums = torch.zeros(3, device=micro_batches[0].device)  # objective, lm loss, aux loss (means over micro-batches)
    expert_counts: dict[int, torch.Tensor] = {}
    for index, ids in enumerate(micro_batches):
        with sync.accumulating(index == count - 1):
            with autocast():
                out = model(input_ids=ids, labels=ids)
            objective = out.loss / count  # ours: lm loss + weighted router losses
            (scaler.scale(objective) if scaling else objective).backward()
        lm_loss, aux_loss = getattr(out, "lm_loss", None), getattr(out, "aux_loss", None)
        sums += torch.stack([out.loss.detach().float(), (lm_loss if lm_loss is not None else out.loss).detach().float(),
                             aux_loss.detach().float() if aux_loss is not None else sums.new_zeros(())]) / count
        for stats in getattr(out, "router_stats", None) or []:
            expert_counts[stats.layer] = expert_counts.get(stats.layer, 0) + stats.tokens_per_expert.detach()
    sync.reduce(params)
    all_reduce_mean(sums)
    loss, lm, aux = sums.tolist()
    if not math.isfinite(loss):
        raise NonFiniteStep(f"the loss is {loss}")
    if scaling:
        scaler.unscale_(optimizer)
    norm = sync.norm(params)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    if not math.isfinite(grad_norm) and not scaling:
        raise NonFiniteStep(f"the gradient norm is {grad_norm}")
    if scaling:  # fp16: the scaler drives the step (and skips it on inf gradients)
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        clipped_step(optimizer, params, norm, clip)
    optimizer.zero_grad(set_to_none=True)
    return StepNumbers(loss, lm, aux, grad_norm, expert_counts)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  dtype: torch.dtype, sync: GradientSync | None = None) -> Callable[[torch.Tensor], float]:
    """`optimizer_step` on one batch `ids` (B, T) at autocast `dtype` (bf16/fp16; fp32: none), clipped to 1:
    what the race's twins and the benchmarks step. Returns the LM loss (a float: on CUDA that waits for the
    step, so timing the call times the step)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(ids: torch.Tensor) -> float:
        autocast = functools.partial(torch.autocast, ids.device.type, dtype=dtype,
                                     enabled=dtype in (torch.bfloat16, torch.float16))
        return optimizer_step(model, [ids], optimizer, params, sync, autocast=autocast).lm_loss
    return step


def measure_step_seconds(configs: dict[str, TrainConfig], rounds: int = 3,
                         on_round: Callable[[int], None] | None = None) -> dict[str, float]:
    """Median seconds of one training step of each config's run, all timed in turns in this process.

    Each model and optimizer is built as the trainer builds them (`build_model`, `prepare_for_training`), on
    the config's device and precision, and steps on the first batch of the config's training split; they are
    thrown away afterwards (the real runs start from the same weights)."""
    from flash_experts.data.tokens import load_split
    from flash_experts.training.model_setup import build_model, prepare_for_training, seed_everything

    calls = {}
    for name, cfg in configs.items():
        device = resolve_device(cfg.run.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            resolve_precision(cfg.run.precision, device), torch.float32)
        seed_everything(cfg.run.seed)
        model, _ = build_model(cfg)
        model.train()
        _, optimizer = prepare_for_training(model, cfg, device)
        batch = cfg.data.batch_size * cfg.data.block_size
        stream = load_split(cfg.data.dir, "train", model.get_input_embeddings().num_embeddings)[:batch]
        ids = torch.from_numpy(stream.astype("int64")).view(cfg.data.batch_size, cfg.data.block_size).to(device)
        calls[name] = functools.partial(training_step(model, optimizer, dtype), ids)
    return interleaved_medians(calls, rounds=rounds, device=resolve_device(next(iter(configs.values())).run.device),
                               on_round=on_round)
