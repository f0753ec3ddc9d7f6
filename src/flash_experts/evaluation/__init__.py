"""Honest evaluation: sliding-window perplexity, router statistics, side-by-side model comparison."""

from flash_experts.evaluation.compare import ComparisonResult, ModelEntry, compare_models, count_parameters
from flash_experts.evaluation.perplexity import (
    PerplexityResult,
    collect_router_stats,
    evaluate_perplexity,
    load_eval_tokens,
    perplexity_with_routing,
)
from flash_experts.model.routing import SplitRouting, SplitRoutingTally

__all__ = [
    "ComparisonResult",
    "ModelEntry",
    "PerplexityResult",
    "SplitRoutingTally",
    "SplitRouting",
    "collect_router_stats",
    "compare_models",
    "count_parameters",
    "evaluate_perplexity",
    "load_eval_tokens",
    "perplexity_with_routing",
]
