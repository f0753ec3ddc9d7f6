"""Routing statistics summed over many forwards: per-layer expert load, routing entropy, confidence, drops,
and how far the experts have moved apart.

Every forward of our MoE models returns `out.router_stats`, one `BatchRouting` per MoE layer (its routing of that batch) (model/moe.py):
`layer`, `tokens_per_expert` (E,) counts of token->expert assignments before capacity drops (they sum to
tokens x top_k), `dropped_tokens`, `entropy` (mean per-token routing entropy, nats) and `top1_prob` (mean
largest routing probability). `SplitRoutingTally` sums them:

- load: each expert's share of all assignments in that layer (sums to 1; uniform = 1/E);
- imbalance: max / mean of the per-expert counts (1.0 = perfectly balanced, E = one expert takes all);
- entropy: token-weighted mean routing entropy, next to its ceiling ln(E) (their ratio: 1 = uniform);
- top-1 probability: token-weighted mean of the largest routing probability (1/E uniform, 1 certain);
- dropped share: dropped assignments / all assignments, 0 for dropless routing;
- expert distance (from the weights, `expert_distances`): 0 while the experts are the upcycled copies.

It lives with the model because the trainer records it at every evaluation (training sits below
evaluation); evaluation/router_stats.py renders it as tables.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from flash_experts.errors import UserError
from flash_experts.model.moe import MoELayer


@dataclass
class SplitRoutingLayer:
    """One MoE layer's routing over a split: a row of SplitRouting."""

    layer: int
    num_experts: int
    tokens: int  # tokens that went through this layer's router
    assignments: int  # token->expert assignments counted in tokens_per_expert
    tokens_per_expert: list[int]
    load: list[float]  # fraction of assignments per expert
    imbalance: float  # max / mean of tokens_per_expert
    entropy: float  # mean routing entropy per token, nats
    max_entropy: float  # ln(num_experts)
    dropped: int
    dropped_share: float  # dropped / assignments
    top1_prob: float = float("nan")  # mean largest routing probability per token (1/E uniform, 1 certain)
    # mean pairwise relative distance of the experts' weights (0 = identical copies); NaN when not measured
    expert_distance: float = float("nan")

    @property
    def entropy_ratio(self) -> float:
        """Routing entropy / ln(E): 1.0 = the router cannot tell the experts apart, 0 = certain."""
        return self.entropy / self.max_entropy if self.max_entropy > 0 else float("nan")


@dataclass
class SplitRouting:
    """A split's routing: one row per MoE layer (SplitRoutingTally adds a split's BatchRoutings up)."""

    layers: list[SplitRoutingLayer] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.layers

    def as_dict(self) -> dict[str, Any]:
        """Every field, plus each layer's entropy ratio and the means over layers that summaries quote."""
        layers = [{**asdict(row), "entropy_ratio": row.entropy_ratio} for row in self.layers]
        return {"layers": layers, "summary": self.summary()}

    def summary(self) -> dict[str, float]:
        """Means over the MoE layers of the entropy ratio, top-1 probability and expert distance, and the
        least and most loaded expert of any layer (shares of that layer's assignments)."""
        if not self.layers:
            return {}

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        return {
            "entropy_ratio": mean([row.entropy_ratio for row in self.layers]),
            "top1_prob": mean([row.top1_prob for row in self.layers]),
            "load_min": min(min(row.load) for row in self.layers),
            "load_max": max(max(row.load) for row in self.layers),
            "expert_distance": mean([row.expert_distance for row in self.layers]),
        }


class SplitRoutingTally:
    """Sums `out.router_stats` over forwards; `result()` turns the sums into per-layer statistics."""

    def __init__(self) -> None:
        self._counts: dict[int, torch.Tensor] = {}  # layer -> (E,) int64 assignment counts
        self._dropped: dict[int, int] = {}
        self._entropy_sum: dict[int, float] = {}  # token-weighted
        self._tokens: dict[int, int] = {}
        self._top1_sum: dict[int, float] = {}  # token-weighted

    def add(self, router_stats: Iterable[Any] | None, num_tokens: int) -> None:
        """Add one forward's per-layer stats; `num_tokens` is how many tokens that forward routed (B * T)."""
        for stats in router_stats or ():
            layer = int(stats.layer)
            counts_E = stats.tokens_per_expert.detach().to("cpu", torch.long).reshape(-1)
            if layer in self._counts and self._counts[layer].numel() != counts_E.numel():
                raise UserError(f"layer {layer} reported {counts_E.numel()} experts after {self._counts[layer].numel()}")
            self._counts[layer] = self._counts.get(layer, torch.zeros_like(counts_E)) + counts_E
            self._dropped[layer] = self._dropped.get(layer, 0) + int(stats.dropped_tokens)
            self._entropy_sum[layer] = self._entropy_sum.get(layer, 0.0) + float(stats.entropy) * num_tokens
            self._tokens[layer] = self._tokens.get(layer, 0) + num_tokens
            self._top1_sum[layer] = self._top1_sum.get(layer, 0.0) + float(stats.top1_prob) * num_tokens

    def result(self, distances: dict[int, float] | None = None) -> SplitRouting:
        """The per-layer statistics; `distances` (layer -> `expert_distances(model)`) adds how far apart the
        experts' weights are."""
        layers = []
        for layer in sorted(self._counts):
            counts_E = self._counts[layer]
            num_experts = counts_E.numel()
            tokens = self._tokens[layer]
            assignments = int(counts_E.sum())
            mean = assignments / num_experts
            layers.append(
                SplitRoutingLayer(
                    layer=layer,
                    num_experts=num_experts,
                    tokens=tokens,
                    assignments=assignments,
                    tokens_per_expert=counts_E.tolist(),
                    load=[c / assignments if assignments else 0.0 for c in counts_E.tolist()],
                    imbalance=int(counts_E.max()) / mean if mean else float("nan"),
                    entropy=self._entropy_sum[layer] / tokens if tokens else float("nan"),
                    max_entropy=math.log(num_experts),
                    dropped=self._dropped[layer],
                    dropped_share=self._dropped[layer] / assignments if assignments else 0.0,
                    top1_prob=self._top1_sum[layer] / tokens if tokens else float("nan"),
                    expert_distance=(distances or {}).get(layer, float("nan")),
                )
            )
        return SplitRouting(layers=layers)


@torch.no_grad()
def expert_distances(model: nn.Module) -> dict[int, float]:
    """Per MoE layer, the mean over expert pairs (i, j) of ||W_i - W_j|| / ((||W_i|| + ||W_j||) / 2), W_e being
    all of expert e's weights (and biases) as one vector: 0 while the experts are the copies upcycling made,
    about sqrt(2) for independent random experts."""
    distances = {}
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        experts = layer.experts
        if not isinstance(getattr(experts, "w_up", None), torch.Tensor):
            continue  # quantized experts (model/quantize) keep no float stacks to compare
        tensors = [p for p in (experts.w_gate, experts.w_up, experts.w_down, experts.b_up, experts.b_down)
                   if p is not None]
        vectors_EP = torch.cat([t.detach().float().reshape(t.shape[0], -1) for t in tensors], dim=1)
        norms_E = vectors_EP.norm(dim=1)
        pairs = [float((vectors_EP[i] - vectors_EP[j]).norm() / ((norms_E[i] + norms_E[j]) / 2).clamp_min(1e-30))
                 for i, j in itertools.combinations(range(vectors_EP.shape[0]), 2)]
        distances[layer.layer_index] = sum(pairs) / len(pairs) if pairs else 0.0
    return distances


def moe_layers_of(model: torch.nn.Module) -> list[MoELayer]:
    return sorted((m for m in model.modules() if isinstance(m, MoELayer)), key=lambda m: m.layer_index)


@contextlib.contextmanager
def recording_routers(model: torch.nn.Module) -> Iterator[dict[int, tuple[Tensor, Tensor, Tensor]]]:
    """Inside the block, every MoE layer's router output of each forward is kept: layer -> (experts_TK,
    weights_TK, probs_TE), the router's own tensors (its top-k after any renormalisation, its softmax)."""
    seen: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    handles = []
    for layer in moe_layers_of(model):
        def keep(module, inputs, output, index=layer.layer_index):  # noqa: ANN001 (torch's hook signature)
            seen[index] = (output.experts_TK.detach(), output.weights_TK.detach(), output.probs_TE.detach())

        handles.append(layer.router.register_forward_hook(keep))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
