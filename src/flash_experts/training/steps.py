"""One training step as a function, and step times measured side by side.

`training_step` is the trainer's step (forward, loss, backward, clipping, the optimizer update) for a model and
optimizer built anywhere: the race's twins step with it, and the benchmarks time it. `interleaved_medians` and
`measure_step_seconds` time several steps taking turns (round r times one step of each): a shared machine's
speed drifts over minutes, and turns expose every contender to the same drift, so the ratios hold even when the
absolute times move. They measure; a contest's budget is FLOPs (flash_experts/contest/budget.py), never seconds.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import torch

from flash_experts.training.config import TrainConfig, resolve_device, resolve_precision
from flash_experts.training.optimizer import clipped_step, gradient_norm


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
                  dtype: torch.dtype, gradients: Any = None) -> Callable[[torch.Tensor], float]:
    """One training step on `ids` (B, T), the work of the trainer's step: forward, loss, backward, gradient
    clipping, optimizer update. Works for any causal LM taking `labels` (ours and HF's). Returns the LM loss
    (a float: on CUDA that waits for the step, so timing the call times the step). `gradients`: over several
    processes, what averages the gradients after the backward and gives the clipping norm (`reduce(params)`,
    `norm(params)`: training/distributed.py `AveragedGradients`, training/expert_parallel.py)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()  # ours: lm loss + weighted router losses (the training objective)
        if gradients is not None:
            gradients.reduce(params)
        norm = gradient_norm(params) if gradients is None else gradients.norm(params)
        clipped_step(optimizer, params, norm, 1.0)
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
