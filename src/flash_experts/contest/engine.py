"""The contest's loop: contenders trained in turns in one process, on the same batches, every step timed.

Both verbs that compare models run on it: `flash-experts demo` (a dense model against its upcycle, each a
Trainer: contest/upcycling.py) and `flash-experts race` (from-scratch twins: contest/race.py). What it
guarantees:

- the budget is compute: each contender trains a number of steps fixed before the first one (contest/budget.py
  derives them from a budget of FLOPs), so what the contest measures of quality is the same on a calm machine
  and a busy one, run to run; seconds are measured, never spent;
- round r steps every unfinished contender once on batch r (a batch is a function of the seed and the step), in
  an order that alternates from round to round, so a step pair runs back to back and neither contender always
  goes first (caches, the allocator's state): the pair's time ratio is what the machine's drift cancels out of;
- the contender times its own step (the training step alone: no evaluation, logging or checkpoint), and the log
  keeps every step's seconds, so the report can give the step-cost ratio with its spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol


class Contender(Protocol):
    """One model in a contest: it trains one step at a time and says when it is done."""

    @property
    def done(self) -> bool:
        """Its steps are spent (or it stopped early: divergence, early stopping)."""

    def step(self, index: int) -> float:
        """One training step on batch `index`, and whatever follows it (logging, evaluation, checkpoints);
        returns the seconds of the training step alone."""


@dataclass
class ContestLog:
    """What the loop measured: each contender's step seconds in step order (this invocation's steps), and how
    the loop ended."""

    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    first_step: int = 0  # the step index of each list's first entry (a resumed contest starts later)
    stopped: str = "finished"  # or "interrupted at step N"


def run_contest(contenders: dict[str, Contender], first_step: int = 0,
                after_round: Callable[[int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> ContestLog:
    """Train the contenders in turns until every one is done; returns the step times.

    `after_round(steps_done)` runs after each round (the race evaluates both contenders there, at equal
    tokens); `should_stop()` is asked after each round (Ctrl-C: the caller's StopRequest), and ends the loop with
    `stopped = "interrupted at step N"`."""
    log = ContestLog({name: [] for name in contenders}, first_step=first_step)
    names = list(contenders)
    index = first_step
    while running := [name for name in names if not contenders[name].done]:
        order = running if (index - first_step) % 2 == 0 else running[::-1]
        for name in order:
            log.step_seconds[name].append(contenders[name].step(index))
        index += 1
        if after_round is not None:
            after_round(index)
        if should_stop is not None and should_stop() and any(not contenders[n].done for n in names):
            log.stopped = f"interrupted at step {index}"
            break
    return log
