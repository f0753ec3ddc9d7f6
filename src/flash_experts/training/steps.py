"""Equal compute: the same seconds of training for each of several runs, measured on this machine.

A run whose step costs 1.5x another's gets 1/1.5 of its steps. Step times come from the runs' own models and
optimizers, built as the trainer builds them, with the contenders taking turns (round r times one step of
each): a shared machine's speed drifts over minutes, and turns expose every contender to the same drift, so
the ratios hold even when the absolute times move. Used by `flash-experts demo` (the dense model against the
MoE) and by benchmarks/sweep_upcycling.py (every recipe). `train_interleaved` then trains the runs taking
turns in one process, each until its own measured step time reaches the budget.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch

from flash_experts.training.config import TrainConfig, resolve_device, resolve_precision
from flash_experts.training.optimizer import clipped_step, gradient_norm

if TYPE_CHECKING:
    from flash_experts.training.trainer import TrainResult


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


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
    """One training step on `ids` (B, T), the work of the trainer's step: forward, loss, backward, gradient
    clipping, optimizer update. Works for any causal LM taking `labels` (ours and HF's). Returns the LM loss
    (a float: on CUDA that waits for the step, so timing the call times the step)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()  # ours: lm loss + weighted router losses (the training objective)
        clipped_step(optimizer, params, gradient_norm(params), 1.0)
        optimizer.zero_grad(set_to_none=True)
        lm = getattr(out, "lm_loss", None)
        return float((lm if lm is not None else out.loss).detach())
    return step


def measure_step_seconds(configs: dict[str, TrainConfig], rounds: int = 3,
                         on_round: Callable[[int], None] | None = None) -> dict[str, float]:
    """Median seconds of one training step of each config's run, all timed in turns in this process.

    Each model and optimizer is built as the trainer builds them (`build_model`, `prepare_for_training`), on
    the config's device and precision, and steps on the first batch of the config's training split; they are
    thrown away afterwards (the real runs start from the same weights)."""
    from flash_experts.data.tokens import load_split
    from flash_experts.training.trainer import build_model, prepare_for_training, seed_everything

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


def steps_for_budget(seconds_per_step: float, budget_seconds: float) -> int:
    """Whole steps that fit the budget (at least one)."""
    return max(1, int(budget_seconds / seconds_per_step))


def train_interleaved(configs: dict[str, TrainConfig], resume: str | None = None) -> dict[str, "TrainResult"]:
    """Train several runs in this one process, taking turns, each until its own budget of measured
    training-step time (`optim.time_budget`) is spent. Returns each run's TrainResult.

    Planning steps from a timing taken before training trusts that the machine keeps its speed for the next
    quarter of an hour, which a shared machine does not: the runs would get different compute and the verdict
    would follow the drift. Here every turn steps the run that has spent the least step time so far (the
    first named on a tie), so the runs keep pace in compute, a slow minute slows all of them, and each
    stops within half a step of its budget. Runs with the same seed and data see the same batches in the
    same order (a batch is a function of seed and step).

    One process only (no torchrun). SIGINT/SIGTERM finish the current step and save every unfinished run;
    `resume` ("auto" or None) continues each from its own folder.
    """
    import contextlib

    from flash_experts.errors import UserError
    from flash_experts.training import distributed as dist_utils
    from flash_experts.training.run_lock import RunFolderLock
    from flash_experts.training.trainer import StopRequest, Trainer

    devices = {resolve_device(cfg.run.device) for cfg in configs.values()}
    if len(devices) != 1 or dist_utils.launched_by_torchrun():
        raise UserError("interleaved runs train in one process on one device")
    for name, cfg in configs.items():
        if not cfg.optim.time_budget > 0:
            raise UserError(f"run {name!r} needs optim.time_budget > 0 to train interleaved")
    info = dist_utils.init_distributed(devices.pop())
    with contextlib.ExitStack() as held:
        for cfg in configs.values():
            held.enter_context(RunFolderLock(cfg.run.out_dir))
        trainers: dict[str, Trainer] = {}
        try:
            for name, cfg in configs.items():
                trainers[name] = Trainer(cfg, info, resume)
            for trainer in trainers.values():
                trainer.begin()
            with StopRequest() as stop:
                while running := [t for t in trainers.values() if not t.done]:
                    min(running, key=lambda t: t.train_seconds).advance()
                    if stop.requested:
                        for trainer in running:
                            if not trainer.done:
                                trainer.stopped = "interrupted"
                        break
            return {name: trainer.end(stop.signal_name) for name, trainer in trainers.items()}
        finally:
            for trainer in trainers.values():
                trainer.close()
