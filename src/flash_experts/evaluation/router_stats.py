"""How an MoE model routes an evaluation stream: per-layer expert load, routing entropy, dropped tokens.

Every forward of our MoE models returns `out.router_stats`, one `RouterStats` per MoE layer (see
ARCHITECTURE.md): `layer`, `tokens_per_expert` (E,) counts of token->expert assignments before capacity
drops (they sum to tokens x top_k), `dropped_tokens` (assignments over capacity), `entropy` (mean
per-token routing entropy, nats). This module sums them over many forwards:

- load: each expert's share of all assignments in that layer (sums to 1; uniform = 1/E);
- imbalance: max / mean of the per-expert counts (1.0 = perfectly balanced, E = one expert takes all);
- entropy: token-weighted mean routing entropy, next to its ceiling ln(E);
- dropped share: dropped assignments / all assignments, 0 for dropless routing.

A dense model (no `router_stats`, or an empty list) gives an empty result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from flash_experts.errors import UserError


@dataclass
class LayerRouting:
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


@dataclass
class RouterStatsResult:
    layers: list[LayerRouting] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.layers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RouterStatsAccumulator:
    """Sums `out.router_stats` over forwards; `result()` turns the sums into per-layer statistics."""

    def __init__(self) -> None:
        self._counts: dict[int, torch.Tensor] = {}  # layer -> (E,) int64 assignment counts
        self._dropped: dict[int, int] = {}
        self._entropy_sum: dict[int, float] = {}  # token-weighted
        self._tokens: dict[int, int] = {}

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

    def result(self) -> RouterStatsResult:
        layers = []
        for layer in sorted(self._counts):
            counts_E = self._counts[layer]
            num_experts = counts_E.numel()
            tokens = self._tokens[layer]
            assignments = int(counts_E.sum())
            mean = assignments / num_experts
            layers.append(
                LayerRouting(
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
                )
            )
        return RouterStatsResult(layers=layers)


def router_stats_table(result: RouterStatsResult, title: str = "Routing") -> Any:
    """A rich Table with one row per MoE layer."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("layer", "experts", "tokens", "load min / max", "imbalance (max/mean)", "entropy (nats)", "dropped"):
        table.add_column(column, justify="right", overflow="fold")  # fold, never truncate numbers
    for row in result.layers:
        table.add_row(
            str(row.layer), str(row.num_experts), f"{row.tokens:,}", f"{min(row.load):.3f} / {max(row.load):.3f}",
            f"{row.imbalance:.2f}", f"{row.entropy:.3f} / {row.max_entropy:.3f}", f"{row.dropped_share:.2%}",
        )
    return table


def router_stats_markdown(result: RouterStatsResult) -> str:
    """The same table in Markdown, plus each layer's full load vector."""
    if result.is_empty:
        return "Dense model: no routers.\n"
    lines = [
        "| layer | experts | tokens | load min / max | imbalance (max/mean) | entropy / ln(E) (nats) | dropped |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.layers:
        lines.append(
            f"| {row.layer} | {row.num_experts} | {row.tokens:,} | {min(row.load):.3f} / {max(row.load):.3f} | "
            f"{row.imbalance:.2f} | {row.entropy:.3f} / {row.max_entropy:.3f} | {row.dropped_share:.2%} |"
        )
    lines.append("")
    for row in result.layers:
        lines.append(f"- layer {row.layer} load: " + ", ".join(f"{x:.3f}" for x in row.load))
    return "\n".join(lines) + "\n"
