"""The expert atlas (evaluation/expert_atlas.py).

References: counts, shares and lifts worked out by hand on a six-token text; and, on a small random MoE
model, the assignments the studio's trace (one window per forward, its own code path) records, counted
with a plain Counter.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from flash_experts.evaluation.expert_atlas import atlas_from_assignments, expert_atlas


def decode(ids):
    return "".join(f"<{i}>" for i in ids)


def test_atlas_counts_shares_and_lifts_by_hand():
    """Text 5 6 5 7 5 6 (T = 6; n5 = 3, n6 = 2, n7 = 1), top-1, two experts: expert 0 takes both early 5s,
    expert 1 the rest. A0 = 2, A1 = 4. lift(0, 5) = 2*6 / (2*3) = 2; lift(1, 6) = 2*6 / (4*2) = 1.5;
    lift(1, 7) = 1*6 / (4*1) = 1.5 (a tie: the larger count first); lift(1, 5) = 1*6 / (4*3) = 0.5."""
    tokens = [5, 6, 5, 7, 5, 6]
    atlas = atlas_from_assignments(tokens, {3: [[0], [1], [0], [1], [1], [1]]}, 2, decode, min_count=1, window=1)
    (layer,) = atlas.layers
    assert layer.layer == 3 and atlas.tokens == 6
    e0, e1 = layer.experts
    assert (e0.assignments, e1.assignments) == (2, 4)
    assert (e0.share, e1.share) == pytest.approx((2 / 6, 4 / 6))
    assert [(t.token_id, t.count, t.occurrences) for t in e0.top_tokens] == [(5, 2, 3)]
    assert e0.top_tokens[0].lift == pytest.approx(2.0)
    assert [t.token_id for t in e1.top_tokens] == [6, 7, 5]
    assert [t.lift for t in e1.top_tokens] == pytest.approx([1.5, 1.5, 0.5])
    # the top token in context, one token each side, at every place it went to the expert
    assert e0.examples == ["...[<5>]<6>...", "...<6>[<5>]<7>..."]
    assert layer.line().startswith("layer 3: e0 33% <5>x2.0 | e1 67% <6>x1.5 <7>x1.5")


def test_min_count_hides_rare_tokens_and_top_k_counts_every_assignment():
    """Top-2 over three experts: every token counts once per expert it went to (shares of 2T assignments).
    Token 9 occurs once: with min_count 2 it is never listed, whatever its lift."""
    tokens = [1, 1, 1, 9]
    experts = [[0, 1], [0, 1], [0, 2], [2, 1]]
    atlas = atlas_from_assignments(tokens, {0: experts}, 3, decode, min_count=2)
    shares = [e.share for e in atlas.layers[0].experts]
    assert shares == pytest.approx([3 / 8, 3 / 8, 2 / 8])
    listed = {t.token_id for e in atlas.layers[0].experts for t in e.top_tokens}
    assert listed == {1}
    assert [t.count for t in atlas.layers[0].experts[0].top_tokens] == [3]
    assert atlas.layers[0].experts[2].top_tokens == []  # expert 2 took token 1 once and token 9 once


def test_atlas_of_a_model_matches_the_studio_trace_counted_by_hand(tiny_moe_model):
    """Reference: studio/trace.py's trace_text, one window per forward, its experts counted with Counter."""
    from flash_experts.studio.trace import trace_text

    model, tokenizer = tiny_moe_model
    context = 16
    tokens = torch.randint(0, 60, (5 * context + 3,), generator=torch.Generator().manual_seed(0)).tolist()
    atlas = expert_atlas(model, tokenizer, tokens, context=context, batch_size=2, min_count=2)
    assert atlas.tokens == len(tokens)
    counted: dict[int, Counter] = {}
    for start in range(0, len(tokens), context):  # the last window holds the 3 left over
        window = tokens[start:start + context]
        trace = trace_text(model, tokenizer, window)
        for layer, experts_T in zip(trace.moe_layers, trace.experts):
            for token, chosen in zip(window, experts_T):
                for e in chosen:
                    counted.setdefault(layer, Counter())[(e, token)] += 1
    assert [layer.layer for layer in atlas.layers] == sorted(counted)
    for layer in atlas.layers:
        per_expert = Counter()
        for (e, _token), n in counted[layer.layer].items():
            per_expert[e] += n
        assert [e.assignments for e in layer.experts] == [per_expert[e.expert] for e in layer.experts]
        for e in layer.experts:
            for t in e.top_tokens:
                assert t.count == counted[layer.layer][(e.expert, t.token_id)]
                assert t.count >= 2


def test_atlas_needs_a_token(tiny_moe_model):
    from flash_experts.errors import UserError

    model, tokenizer = tiny_moe_model
    with pytest.raises(UserError, match="at least one token"):
        expert_atlas(model, tokenizer, [], context=16)


@pytest.fixture(scope="module")
def tiny_moe_model():
    from transformers import GPT2LMHeadModel

    from conftest import tiny_gpt2_config
    from flash_experts.model import upcycle

    torch.manual_seed(0)
    dense = GPT2LMHeadModel(tiny_gpt2_config())
    model = upcycle(dense, num_experts=4, top_k=2, moe_layers="all", expert_noise=0.5, seed=0)
    model.eval()

    class Tokenizer:
        def decode(self, ids):
            return decode(ids)

    return model, Tokenizer()
