"""Learning-rate schedules as pure functions of the optimizer step.

A function of the step (nanoGPT style) instead of a stateful torch scheduler: resuming only needs the step
number, which the checkpoint stores, and the rate at any step can be read off without running anything.
"""

from __future__ import annotations

import math

from flash_experts.errors import ConfigError

SCHEDULES = ("cosine", "constant")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to `min_lr` or constant.

    Warmup rises linearly to `lr` over `warmup_steps` steps, starting at lr / warmup_steps (never 0: a first
    step with rate 0 would be wasted). Cosine then falls from `lr` at the end of warmup to exactly `min_lr` at
    `max_steps`, and stays there for any step beyond.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0 or step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / decay_steps  # 0 at the end of warmup, 1 at max_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
