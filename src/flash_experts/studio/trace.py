"""What the studio page shows, computed from one forward pass: routing, token log-probabilities, attention.

Everything here reads the model as it runs, with router hooks and a recording attention implementation that
exist only inside one call; nothing is approximated. The page draws these numbers and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_experts.errors import UserError
from flash_experts.model.routing import recording_routers


@dataclass
class Trace:
    """One text through one model. T tokens; per MoE layer (in depth order) the router's view of each token."""

    token_ids: list[int]
    tokens: list[str]  # each token's text (decoded alone)
    logprobs: list[float | None]  # log p(token t | tokens < t); None for the first token
    moe_layers: list[int]  # decoder-layer index of each MoE layer
    experts: list[list[list[int]]]  # [layer][token] -> the top-k experts, best first
    weights: list[list[list[float]]]  # [layer][token] -> their combine weights
    probs: list[list[list[float]]]  # [layer][token] -> the router's softmax over all experts

    def as_dict(self) -> dict:
        return dict(token_ids=self.token_ids, tokens=self.tokens, logprobs=self.logprobs, moe_layers=self.moe_layers,
                    experts=self.experts, weights=self.weights, probs=self.probs)


@torch.inference_mode()
def trace_text(model: torch.nn.Module, tokenizer, token_ids: list[int]) -> Trace:  # noqa: ANN001
    """Route and score `token_ids` in one forward pass of `model` (any causal LM; dense ones have no layers)."""
    if not token_ids:
        raise UserError("nothing to trace: no tokens")
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    with recording_routers(model) as seen:
        logits = model(input_ids=ids).logits[0].float()
    logprobs_T = F.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    layers = sorted(seen)
    return Trace(
        token_ids=list(token_ids),
        tokens=[tokenizer.decode([token]) for token in token_ids],
        logprobs=[None, *logprobs_T.tolist()],
        moe_layers=layers,
        experts=[seen[i][0].tolist() for i in layers],
        weights=[seen[i][1].tolist() for i in layers],
        probs=[seen[i][2].tolist() for i in layers],
    )


@torch.inference_mode()
def attention_maps(model: torch.nn.Module, token_ids: list[int]) -> list[Tensor]:
    """Every layer's attention probabilities for `token_ids`: a list (one per layer) of (H, T, T) float32.

    Our models compute attention through `flash_experts.attention.attention`, which never forms the
    probabilities; for this one forward the model runs a recording implementation (attention/recording.py)
    that keeps softmax(q k^T * scale) under the same masks, then returns the usual output.
    """
    from flash_experts.attention.recording import RecordingAttention, running_attention

    if not type(model).__module__.startswith("flash_experts.model."):
        raise UserError(f"attention maps are drawn for this package's models; {type(model).__name__} is not one")
    recorder = RecordingAttention(model.config.attention_implementation)
    device = next(model.parameters()).device
    with running_attention(model, recorder):
        model(input_ids=torch.tensor([token_ids], device=device))
    return recorder.maps
