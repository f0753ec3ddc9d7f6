"""Two greedy decoders for parity tests: full recomputation each step (the reference) and our static cache."""

from __future__ import annotations

import torch


def greedy_reference(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by full recomputation each step (no cache): the plainest possible loop."""
    for _ in range(steps):
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def greedy_with_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    cache = model.make_cache(ids.shape[0], ids.shape[1] + steps)
    out = model(ids, past_key_values=cache, use_cache=True)
    generated = [ids]
    for _ in range(steps):
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_id)
        out = model(next_id, past_key_values=cache, use_cache=True)
    return torch.cat(generated, dim=1)
