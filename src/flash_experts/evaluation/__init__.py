"""Honest evaluation: sliding-window perplexity, router statistics, side-by-side model comparison."""

from flash_experts.evaluation.compare import ComparisonResult, ModelEntry, compare_models, count_parameters
from flash_experts.evaluation.perplexity import PerplexityResult, evaluate_perplexity, load_eval_tokens
from flash_experts.evaluation.router_stats import RouterStatsAccumulator, RouterStatsResult, collect_router_stats

__all__ = [
    "ComparisonResult",
    "ModelEntry",
    "PerplexityResult",
    "RouterStatsAccumulator",
    "RouterStatsResult",
    "collect_router_stats",
    "compare_models",
    "count_parameters",
    "evaluate_perplexity",
    "load_eval_tokens",
]
