"""Router statistics aggregation against hand-computed values and a direct top-k count."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))

from flash_experts.evaluation.perplexity import collect_router_stats  # noqa: E402
from flash_experts.evaluation.router_stats import router_stats_markdown, router_stats_table  # noqa: E402
from flash_experts.model.moe import BatchRouting, MoELayer, MoESettings  # noqa: E402
from flash_experts.model.routing import SplitRoutingTally  # noqa: E402


def stats(layer: int, counts: list[int], dropped: int, entropy: float) -> BatchRouting:
    zero = torch.tensor(0.0)
    return BatchRouting(layer, torch.tensor(counts), torch.tensor(dropped), zero, zero, torch.tensor(entropy),
                       top1_prob=zero)


def test_accumulator_matches_hand_computed_values():
    """Reference: numbers worked out by hand for two forwards over two layers (top_k = 2)."""
    accumulator = SplitRoutingTally()
    # forward 1: 4 tokens -> 8 assignments per layer; forward 2: 2 tokens -> 4 assignments.
    accumulator.add([stats(1, [4, 2, 1, 1], 0, 1.0), stats(3, [2, 2, 2, 2], 2, 1.2)], num_tokens=4)
    accumulator.add([stats(1, [0, 2, 1, 1], 0, 0.4), stats(3, [4, 0, 0, 0], 1, 0.6)], num_tokens=2)
    layer1, layer3 = accumulator.result().layers

    assert layer1.layer == 1 and layer1.tokens_per_expert == [4, 4, 2, 2]
    assert layer1.tokens == 6 and layer1.assignments == 12
    assert layer1.load == pytest.approx([1 / 3, 1 / 3, 1 / 6, 1 / 6])
    assert layer1.imbalance == pytest.approx(4 / 3)  # max 4 over mean 3
    assert layer1.entropy == pytest.approx((1.0 * 4 + 0.4 * 2) / 6)  # token-weighted
    assert layer1.max_entropy == pytest.approx(math.log(4))
    assert layer1.dropped == 0 and layer1.dropped_share == 0.0

    assert layer3.tokens_per_expert == [6, 2, 2, 2]
    assert layer3.imbalance == pytest.approx(2.0)
    assert layer3.entropy == pytest.approx((1.2 * 4 + 0.6 * 2) / 6)
    assert layer3.dropped == 3 and layer3.dropped_share == pytest.approx(3 / 12)


def test_top1_probability_is_token_weighted_and_the_summary_averages_layers():
    """Reference: by hand. Layer 1: 4 tokens at mean top-1 0.5, then 2 at 0.8 -> (2 + 1.6) / 6 = 0.6; layer 3:
    0.9 throughout. The summary: means over the two layers, the least and most loaded expert of any layer."""
    accumulator = SplitRoutingTally()
    zero = torch.tensor(0.0)
    for layer, counts, top1, tokens in ((1, [3, 1], 0.5, 4), (3, [2, 2], 0.9, 4), (1, [2, 0], 0.8, 2),
                                        (3, [1, 1], 0.9, 2)):
        accumulator.add([BatchRouting(layer, torch.tensor(counts), torch.tensor(0), zero, zero,
                                     torch.tensor(math.log(2) / 2), torch.tensor(top1))], num_tokens=tokens)
    result = accumulator.result(distances={1: 0.25, 3: 0.75})
    layer1, layer3 = result.layers
    assert layer1.top1_prob == pytest.approx(0.6) and layer3.top1_prob == pytest.approx(0.9)
    assert layer1.entropy_ratio == pytest.approx(0.5)
    summary = result.summary()
    assert summary["top1_prob"] == pytest.approx(0.75)
    assert summary["entropy_ratio"] == pytest.approx(0.5)
    assert summary["load_min"] == pytest.approx(1 / 6) and summary["load_max"] == pytest.approx(5 / 6)
    assert summary["expert_distance"] == pytest.approx(0.5)
    assert result.as_dict()["layers"][0]["entropy_ratio"] == pytest.approx(0.5)


def test_expert_distances_by_hand():
    """Reference: float64 by hand on a two-expert layer whose weights are set: expert 0 all ones, expert 1
    all twos (every weight and bias): ||W0 - W1|| / ((||W0|| + ||W1||) / 2) = sqrt(n) / (1.5 sqrt(n)) = 2/3.
    Identical copies (what upcycling makes): 0."""
    from flash_experts.model.routing import expert_distances

    model = _OneMoELayerLM(experts=2, top_k=1)
    with torch.no_grad():
        for p in model.moe.experts.parameters():
            p[0].fill_(1.0)
            p[1].fill_(2.0)
    assert expert_distances(model) == {0: pytest.approx(2 / 3)}
    with torch.no_grad():
        for p in model.moe.experts.parameters():
            p[1].copy_(p[0])
    assert expert_distances(model) == {0: 0.0}


def test_dense_model_gives_empty_result():
    """Reference: a dense model has no routers, so nothing is reported."""
    accumulator = SplitRoutingTally()
    accumulator.add(None, num_tokens=10)
    accumulator.add([], num_tokens=10)
    result = accumulator.result()
    assert result.is_empty and result.layers == []
    assert "Dense" in router_stats_markdown(result)


class _OneMoELayerLM(torch.nn.Module):
    """Embedding -> one MoELayer -> logits: just enough model to produce real BatchRouting."""

    def __init__(self, vocab: int = 50, width: int = 16, experts: int = 4, top_k: int = 2, capacity_factor: float = 0.0):
        super().__init__()
        self.config = SimpleNamespace(n_positions=32, vocab_size=vocab)
        self.embed = torch.nn.Embedding(vocab, width)
        self.moe = MoELayer(MoESettings(num_experts=experts, num_experts_per_tok=top_k, capacity_factor=capacity_factor),
                            hidden_size=width, ffn_size=32, activation=torch.nn.functional.gelu, gated=False,
                            bias=True, layer_index=0)
        for p in self.moe.parameters():
            torch.nn.init.normal_(p, std=0.5)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, use_cache=False):
        x = self.embed(input_ids)
        y, layer_stats = self.moe(x)
        return SimpleNamespace(logits=self.head(x + y), router_stats=[layer_stats])


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_collect_over_stream_matches_direct_topk_count(capacity_factor):
    """Reference: bincount of the router's own top-k choices over every token of the stream."""
    torch.manual_seed(0)
    model = _OneMoELayerLM(capacity_factor=capacity_factor).eval()
    stream = torch.randint(0, 50, (100,))
    result = collect_router_stats(model, stream, context=32, batch_size=2, quiet=True)
    (layer,) = result.layers

    with torch.no_grad():
        _, experts_TK, _, probs_TE = model.moe.router(model.embed(stream))
    expected_counts = torch.bincount(experts_TK.reshape(-1), minlength=4)
    expected_entropy = -(probs_TE * probs_TE.log()).sum(-1).mean().item()
    assert layer.tokens_per_expert == expected_counts.tolist()
    assert layer.top1_prob == pytest.approx(probs_TE.max(-1).values.mean().item(), rel=1e-4)
    assert layer.entropy_ratio == pytest.approx(expected_entropy / math.log(4), rel=1e-4)
    assert layer.tokens == 100 and layer.assignments == 200
    assert layer.entropy == pytest.approx(expected_entropy, rel=1e-4)
    assert layer.imbalance == pytest.approx(expected_counts.max().item() / 50)
    if capacity_factor == 0:
        assert layer.dropped == 0
    else:
        assert 0 < layer.dropped_share < 1

    table = router_stats_table(result)
    assert table.row_count == 1
