"""A contest's budget: training FLOPs, the same for every contender, turned into each one's steps.

Seconds would make the answer follow the machine's load (issue 35: one seed printed 0.966 to 1.117 with what
else ran); FLOPs are a property of the models (`model.flops_per_token`, model/flops.py), so the steps, the
batches and therefore every quality figure are the same on any machine, calm or busy, run to run. Where the
contenders' FLOPs per token agree within EQUAL_TOKENS_TOLERANCE (a top-1 upcycle adds only its routers; the
race's twins are iso-FLOP by construction) they train the same tokens, so every evaluation compares them at
equal tokens exactly; otherwise each gets the steps its own cost allows, and evaluations fall at the same
fractions of the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flash_experts.errors import UserError

EQUAL_TOKENS_TOLERANCE = 0.01


@dataclass(frozen=True)
class ComputeBudget:
    """Training FLOPs for each contender, named by the reference contender's tokens (what a reader can picture:
    "the dense model's 46k tokens")."""

    flops: float
    reference: str  # the contender whose FLOPs per token define the tokens below
    reference_tokens: int

    @staticmethod
    def of_tokens(tokens: int, reference: str, flops_per_token: dict[str, float]) -> "ComputeBudget":
        if not isinstance(tokens, int) or tokens < 1:
            raise UserError(f"the budget must be a whole number of tokens >= 1, got {tokens!r}")
        return ComputeBudget(tokens * flops_per_token[reference], reference, tokens)

    @staticmethod
    def of_flops(flops: float, reference: str, flops_per_token: dict[str, float]) -> "ComputeBudget":
        if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0):
            raise UserError(f"the budget must be a number of FLOPs > 0, got {flops!r}")
        return ComputeBudget(float(flops), reference, int(flops // flops_per_token[reference]))

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def steps_for_budget(budget: ComputeBudget, flops_per_token: dict[str, float], tokens_per_step: int) -> dict[str, int]:
    """Each contender's steps: the budget over its training FLOPs per step (at least one step). Contenders whose
    FLOPs per token are within EQUAL_TOKENS_TOLERANCE of the reference's train the reference's steps (equal
    tokens); the others their own share."""
    if tokens_per_step < 1:
        raise UserError(f"a step must train at least one token, got {tokens_per_step}")
    reference_steps = max(1, int(budget.flops // (flops_per_token[budget.reference] * tokens_per_step)))
    steps = {}
    for name, flops in flops_per_token.items():
        if abs(flops / flops_per_token[budget.reference] - 1) <= EQUAL_TOKENS_TOLERANCE:
            steps[name] = reference_steps
        else:
            steps[name] = max(1, int(budget.flops // (flops * tokens_per_step)))
    return steps


def equal_tokens(flops_per_token: dict[str, float]) -> bool:
    """Whether every contender's FLOPs per token are within the tolerance of every other's."""
    values = list(flops_per_token.values())
    return max(values) / min(values) - 1 <= EQUAL_TOKENS_TOLERANCE
