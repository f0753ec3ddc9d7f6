"""The validation loss every training loop reports: the mean next-token cross entropy over fixed windows.

One path for the trainer (its validation batches, summed across processes) and the race (each domain's
windows), so that "validation loss" means the same number in both: the language-model loss alone (no router
losses), every prediction weighted alike (a window of T tokens makes T - 1), accumulated in float64.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterable

import torch


@torch.no_grad()
def next_token_loss_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                         autocast: Callable[[], AbstractContextManager] = nullcontext,
                         on_output: Callable[[Any, torch.Tensor], None] | None = None) -> tuple[float, int]:
    """(summed loss, predictions) of `model` over `batches` of windows (B, T) in eval mode (restored after):
    each batch's mean LM loss times its B x (T - 1) predictions. `on_output(output, batch)` sees each forward's
    output (the trainer's router statistics)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids in batches:
            with autocast():
                out = model(input_ids=ids, labels=ids)
            if on_output is not None:
                on_output(out, ids)
            lm = getattr(out, "lm_loss", None)
            predicted = ids.shape[0] * (ids.shape[1] - 1)  # labels are shifted inside: T - 1 per window
            total += float((lm if lm is not None else out.loss).double()) * predicted
            count += predicted
    finally:
        model.train(was_training)
    return total, count


def mean_next_token_loss(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                         autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    """The mean next-token loss (nats per token) over `batches`."""
    total, count = next_token_loss_sums(model, batches, autocast)
    if count == 0:
        raise ValueError("no windows to evaluate")
    return total / count
