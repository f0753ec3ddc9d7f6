"""Routing statistics as tables: a rich table for the terminal, Markdown for reports.

The numbers (expert load, routing entropy and its ratio to ln E, mean top-1 probability, drops, how far the
experts have moved apart) are computed by model/routing.py, which the trainer uses at every evaluation too.
A dense model (no `router_stats`) gives an empty result.
"""

from __future__ import annotations

from typing import Any

from flash_experts.model.routing import SplitRouting, SplitRoutingLayer


def router_stats_table(result: SplitRouting, title: str = "Routing") -> Any:
    """A rich Table with one row per MoE layer."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("layer", "experts", "tokens", "load min / max", "imbalance (max/mean)", "entropy / ln E",
                   "top-1 prob", "expert distance", "dropped"):
        table.add_column(column, justify="right", overflow="fold")  # fold, never truncate numbers
    for row in result.layers:
        table.add_row(*_cells(row))
    return table


def router_stats_markdown(result: SplitRouting) -> str:
    """The same table in Markdown, plus each layer's full load vector."""
    if result.is_empty:
        return "Dense model: no routers.\n"
    lines = [
        "| layer | experts | tokens | load min / max | imbalance (max/mean) | entropy / ln E | top-1 prob | "
        "expert distance | dropped |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result.layers]
    lines.append("")
    for row in result.layers:
        lines.append(f"- layer {row.layer} load: " + ", ".join(f"{x:.3f}" for x in row.load))
    return "\n".join(lines) + "\n"


def _cells(row: SplitRoutingLayer) -> list[str]:
    distance = "n/a" if row.expert_distance != row.expert_distance else f"{row.expert_distance:.4f}"
    return [str(row.layer), str(row.num_experts), f"{row.tokens:,}", f"{min(row.load):.3f} / {max(row.load):.3f}",
            f"{row.imbalance:.2f}", f"{row.entropy_ratio:.3f} ({row.entropy:.3f} nats)", f"{row.top1_prob:.3f}",
            distance, f"{row.dropped_share:.2%}"]
