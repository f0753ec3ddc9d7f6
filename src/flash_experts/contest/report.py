"""What a contest's measurements say: the step-cost ratio with its spread, each contender's loss at equal
seconds, the exchange rate (how many dense tokens the MoE's result is worth), and from those two the answer
per second.

Quality is compared at equal compute (contest/budget.py) and does not depend on the machine; seconds do. The
step cost is read off step *pairs* (the two contenders' steps of one round ran back to back, so a slow minute
of the machine slows both), as the median of the pairs' ratios with its interquartile range. The answer per
second then follows from the exchange rate and the step cost: the MoE's result at some point cost the dense
model `rate` times the tokens, and a MoE step costs `cost` dense steps, so it pays per second where rate >
cost, and the answer says "pays" only when that holds beyond both spreads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WARMUP_STEPS = 5  # the first step pairs (allocator, thread pool, kernels compiled per shape) are left out


@dataclass(frozen=True)
class Spread:
    """The median of some ratios and their interquartile range."""

    median: float
    q1: float
    q3: float
    count: int

    @staticmethod
    def of(values: np.ndarray | list[float]) -> "Spread":
        values = np.asarray(values, dtype=float)
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return Spread(float(median), float(q1), float(q3), len(values))

    def __str__(self) -> str:
        return f"{self.median:.3f}x (interquartile {self.q1:.3f}-{self.q3:.3f}, {self.count} pairs)"


def pair_ratios(reference_seconds: list[float], other_seconds: list[float]) -> list[float]:
    """The other contender's step seconds over the reference's, pair by pair (the two steps of one round)."""
    return [other / reference for reference, other in zip(reference_seconds, other_seconds)]


def step_cost(reference_seconds: list[float], other_seconds: list[float], warmup: int = WARMUP_STEPS) -> Spread:
    """The other contender's step seconds over the reference's, pair by pair (the two steps of one round),
    warm-up pairs left out while enough remain."""
    pairs = min(len(reference_seconds), len(other_seconds))
    if pairs == 0:
        raise ValueError("no step pairs to compare")
    skip = warmup if pairs > 2 * warmup else 0
    return Spread.of(pair_ratios(reference_seconds[skip:pairs], other_seconds[skip:pairs]))


@dataclass(frozen=True)
class Curve:
    """A contender's validation loss at each evaluation, with the training tokens and the training-step seconds
    it had spent by then."""

    tokens: np.ndarray
    seconds: np.ndarray
    loss: np.ndarray

    @staticmethod
    def of(tokens: list[float], seconds: list[float], loss: list[float]) -> "Curve":
        return Curve(np.asarray(tokens, dtype=float), np.asarray(seconds, dtype=float), np.asarray(loss, dtype=float))


def at_equal_seconds(curves: dict[str, Curve]) -> tuple[float, dict[str, float]]:
    """(seconds, contender -> loss) at the training seconds the faster contender spent in all: its last
    evaluation, and every other contender's loss interpolated between its evaluations at that time (a
    conservative reading for the slower one: its schedule had not decayed yet there)."""
    finish = min(float(curve.seconds[-1]) for curve in curves.values())
    return finish, {name: float(np.interp(finish, curve.seconds, curve.loss)) for name, curve in curves.items()}


def exchange_rate(dense: Curve, moe: Curve) -> tuple[int, float] | None:
    """(evaluation index, rate): at the last evaluation whose MoE loss the dense model reached later in the run,
    the dense tokens needed for that loss over the MoE's tokens (linear between the dense model's evaluations).
    None when the dense model never reached a loss the MoE had (the MoE not ahead, or only at the end)."""
    best = None
    for i in range(1, len(moe.tokens)):
        if i >= len(dense.loss) or moe.loss[i] >= dense.loss[i]:
            continue
        later = np.nonzero(dense.loss[i:] <= moe.loss[i])[0]
        if len(later) == 0:
            continue
        j = i + int(later[0])  # the dense curve crosses the MoE's loss between evaluations j - 1 and j
        drop = dense.loss[j - 1] - dense.loss[j]
        fraction = (dense.loss[j - 1] - moe.loss[i]) / drop if drop else 1.0
        crossing = dense.tokens[j - 1] + fraction * (dense.tokens[j] - dense.tokens[j - 1])
        best = (i, float(crossing / moe.tokens[i]))
    return best


@dataclass(frozen=True)
class PerSecond:
    """The answer per second: "pays", "does not pay" or "even within the spreads", and why."""

    answer: str
    why: str

    def __str__(self) -> str:
        return f"{self.answer}: {self.why}"


def per_second_answer(rates: list[float | None] | None, cost: Spread) -> PerSecond:
    """From the exchange rate, one per seed (None for a seed where the MoE's lead never showed; None or empty:
    no seed showed one) and the step cost. Each seed is read on its own: it pays when its rate exceeds the step
    cost's upper quartile, does not pay when its rate is below the lower quartile or it has none, and is even
    between. Across seeds, "pays per second" only when every seed pays (one seed without it is enough to
    withhold the claim), "does not pay per second" when most seeds do not pay, "even" otherwise. One seed gives
    the exchange rate no spread of its own, and the answer says so."""
    seeds = list(rates or [])
    found = [rate for rate in seeds if rate is not None]
    if not found:
        return PerSecond("does not pay per second",
                         f"the dense model never fell to a loss the MoE had reached, so no step cost makes the MoE's "
                         f"result cheaper per second (a MoE step costs {cost})")
    low, high = min(found), max(found)
    paying = sum(rate > cost.q3 for rate in found)
    not_paying = sum(rate < cost.q1 for rate in found) + len(seeds) - len(found)
    if len(seeds) > 1:
        worth = (f"the MoE's result is worth {low:.2f}-{high:.2f}x the dense tokens over "
                 f"{_count(len(found), 'seed')} with a lead")
        if len(found) == 1:
            worth = f"the MoE's result is worth {low:.2f}x the dense tokens at the one seed with a lead"
        worth += (f"; {paying} of {len(seeds)} seeds pay, {not_paying} do not"
                  f"{' (no lead at ' + str(len(seeds) - len(found)) + ')' if len(found) < len(seeds) else ''}")
    else:
        worth = (f"the MoE's result is worth {low:.2f}x the dense tokens (one seed: the exchange rate's "
                 "seed-to-seed spread is not measured)")
    if paying == len(seeds):
        return PerSecond("pays per second", f"{worth}, more than a MoE step costs ({cost})")
    if 2 * not_paying > len(seeds):
        return PerSecond("does not pay per second", f"{worth}; a MoE step costs {cost}")
    return PerSecond("even per second within the spreads", f"{worth}; a MoE step costs {cost}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
