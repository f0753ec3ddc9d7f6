"""The from-scratch race (`flash-experts race`): the corpus, the iso-FLOP twins, the race's arithmetic, the domain
atlas, the command.

References: PyTorch's own FLOP counter (torch.utils.flop_counter, counting every matrix product the forward
runs) for the iso-FLOP claim; routing decisions recomputed in float64 from each router's captured input and
counted per domain with a loop for the atlas's domain shares; the entropy identity I = H(D) + H(E) - H(D, E)
and tables made by hand for the mutual information; linear interpolation by hand for the race's readings at
equal seconds and its exchange rate; the CLI contract (one `error:` line, exit 2).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flash_experts.cli.main import main
from flash_experts.contest.race import (
    Evaluation,
    RaceResult,
    RaceSettings,
    race_twins,
    run_race,
)
from flash_experts.data.domains import DomainCorpus, python_source_documents
from flash_experts.errors import ConfigError, UserError
from flash_experts.evaluation.domain_atlas import DomainAtlas, domain_expert_counts, mutual_information_bits

TINY = dict(width=32, layers=2, heads=2, context=16, batch_size=6, num_experts=4, num_experts_per_tok=2, eval_windows=4,
            test_windows=4)


def tiny_corpus(seed: int = 0) -> DomainCorpus:
    """Three domains of different byte statistics, enough for a few windows in every split."""
    rng = np.random.default_rng(seed)
    texts = {"upper": lambda n: "".join(rng.choice(list("ABCDEFG "), n)),
             "digits": lambda n: "".join(rng.choice(list("0123456789,"), n)),
             "lower": lambda n: "".join(rng.choice(list("abcdefghij."), n))}
    return DomainCorpus.from_documents({d: {split: [make(400), make(300)] for split in ("train", "val", "test")}
                                        for d, make in texts.items()})


# -- the corpus -------------------------------------------------------------------------------------------------

def test_batches_are_a_function_of_seed_and_step_with_every_domain_in_equal_shares(tmp_path):
    corpus = tiny_corpus()
    a, b = corpus.train_batch(3, 7, 16, seed=5), corpus.train_batch(3, 7, 16, seed=5)
    assert torch.equal(a, b) and a.shape == (7, 16) and a.dtype == torch.int64
    assert not torch.equal(a, corpus.train_batch(4, 7, 16, seed=5))
    # which domain each row came from, read off its bytes: 7 rows over 3 domains = 3/2/2, the extra row rotating
    alphabets = {"upper": set(b"ABCDEFG "), "digits": set(b"0123456789,"), "lower": set(b"abcdefghij.")}
    for step in range(3):
        rows = corpus.train_batch(step, 7, 16, seed=5)
        sources = collections.Counter(next(d for d, chars in alphabets.items() if set(row.tolist()) <= chars)
                                      for row in rows)
        assert sorted(sources.values()) == [2, 2, 3]
        assert sources[corpus.domains[step % 3]] == 3
    # evaluation windows: fixed, not overlapping, spread over the stream
    windows = corpus.windows("digits", "val", 16, 100)
    stream = corpus.streams["digits"]["val"]
    assert len(windows) == len(stream) // 16
    starts = [bytes(stream).find(bytes(w.to(torch.uint8).tolist())) for w in windows]
    assert starts == sorted(starts) and all(b - a >= 16 for a, b in zip(starts, starts[1:]))
    # saved and loaded byte for byte; a damaged folder is one clear error
    corpus.save(tmp_path / "c")
    loaded = DomainCorpus.load(tmp_path / "c")
    assert all(np.array_equal(loaded.streams[d][s], corpus.streams[d][s]) for d in corpus.domains for s in ("val",))
    (tmp_path / "c" / "digits.val.bin").write_bytes(b"123")
    with pytest.raises(UserError, match="digits.val.bin holds 3 bytes"):
        DomainCorpus.load(tmp_path / "c")
    with pytest.raises(UserError, match="not a domain corpus"):
        DomainCorpus.load(tmp_path / "missing")
    with pytest.raises(UserError, match="not more than one window"):
        corpus.check(context=10_000)


def test_python_source_is_the_standard_library_split_by_path(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    for i in range(40):
        (tmp_path / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "test" / "t.py").write_text("skipped\n")
    (tmp_path / "pkg" / "latin1.py").write_bytes(b"# \xe9\n")  # not UTF-8: left out, not an error
    splits = python_source_documents(tmp_path)
    documents = [doc for docs in splits.values() for doc in docs]
    assert sorted(documents) == sorted(f"x = {i}\n" for i in range(40))  # tests and the non-UTF-8 file left out
    assert splits == python_source_documents(tmp_path)  # the split is a function of the path
    with pytest.raises(UserError, match="no Python source"):
        python_source_documents(tmp_path / "test" / "nothing")


# -- the twins: the same FLOPs per token ------------------------------------------------------------------------

def counted_flops(module: torch.nn.Module, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    return counter.get_total_flops()


RECIPES = [  # the race's recipes (benchmarks/race_seeds.py): every one keeps the dense twin's FLOPs per token
    {},
    dict(num_experts=8, num_experts_per_tok=4),  # finer: experts of 4d/4
    dict(num_experts=8, num_experts_per_tok=3, shared_experts=1),  # a shared expert and top-3 routed, each 4d/4
    dict(layers=4, moe_layers="every_other"),  # MoE in layers 1 and 3, dense MLPs of 4d in 0 and 2
    dict(num_experts_per_tok=1),  # Switch: experts of 4d, top-1 (its router gradient: the held sum)
    dict(num_experts=8),  # twice the experts (and expert parameters) of TINY, top-2 of 4d/2 each
]


@pytest.mark.parametrize("recipe", RECIPES, ids=["baseline", "fine", "shared", "every_other", "top1", "many"])
def test_the_twins_have_the_same_matrix_flops_per_token_by_torchs_own_counter(recipe):
    settings = RaceSettings(**{**TINY, **recipe})
    twins = race_twins(settings)
    tokens = 3 * settings.context
    x = torch.randn(3, settings.context, settings.width)
    d, dense_mlp = settings.width, 2 * 2 * settings.width * 4 * settings.width
    router = 2 * d * settings.num_experts
    moe_layers = 0
    for name, model in twins.items():
        # each MLP, counted as it ran: the dense product, or each expert's rows (dropless), the shared expert's
        # rows and the router
        for i, block in enumerate(model.transformer.h):
            is_moe = name == "moe" and (settings.moe_layers == "all" or i % 2 == 1)
            moe_layers += is_moe
            hidden = 4 * d // (settings.num_experts_per_tok + settings.shared_experts)
            expected = ((settings.num_experts_per_tok + settings.shared_experts) * 2 * 2 * d * hidden + router if is_moe
                        else dense_mlp)
            assert counted_flops(block.mlp, x) == tokens * expected, (name, i)
            assert block.is_moe == is_moe
    ids = torch.randint(0, 256, (3, settings.context))
    counted = {name: counted_flops(model, ids) for name, model in twins.items()}
    formula = {name: model.flops_per_token(settings.context) for name, model in twins.items()}
    # the whole forward: the models differ only in their MLPs, so the counts differ by the routers alone
    assert counted["moe"] - counted["dense"] == tokens * router * moe_layers
    assert formula["moe"] - formula["dense"] == pytest.approx((counted["moe"] - counted["dense"]) / tokens)
    assert counted["moe"] / counted["dense"] == pytest.approx(1.0, abs=0.02)
    # and an MoE layer holds (experts + shared) / (top_k + shared) times the MLP weights
    layer = twins["moe"].transformer.h[1].mlp
    dense_params = sum(p.numel() for p in twins["dense"].transformer.h[1].mlp.parameters())
    moe_params = sum(p.numel() for p in layer.parameters()) - layer.router.weight.numel()
    ratio = ((settings.num_experts + settings.shared_experts)
             / (settings.num_experts_per_tok + settings.shared_experts))
    assert moe_params / dense_params == pytest.approx(ratio, rel=0.02)


# -- the domain atlas ---------------------------------------------------------------------------------------------

def test_mutual_information_against_hand_tables_and_the_entropy_identity():
    assert mutual_information_bits(np.eye(3) * 10) == pytest.approx(math.log2(3))
    assert mutual_information_bits(np.outer([1, 2, 3], [4, 1, 1, 2])) == pytest.approx(0.0, abs=1e-12)
    table = np.random.default_rng(0).integers(0, 50, (3, 8)).astype(float)
    p = table / table.sum()

    def entropy(q):
        q = q[q > 0]
        return -np.sum(q * np.log2(q))
    assert mutual_information_bits(table) == pytest.approx(entropy(p.sum(1)) + entropy(p.sum(0)) - entropy(p.ravel()))


def test_domain_shares_equal_routing_recomputed_in_float64_and_counted_by_hand():
    settings = RaceSettings(**TINY)
    moe = race_twins(settings)["moe"]
    corpus = tiny_corpus()
    windows = {d: corpus.windows(d, "val", settings.context, 5) for d in corpus.domains}
    counts = domain_expert_counts(moe, windows, batch_size=2)

    # the reference: each router's input captured, its top-k recomputed in float64, counted token by token
    inputs: dict[int, torch.Tensor] = {}
    hooks = [block.mlp.router.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
             for i, block in enumerate(moe.transformer.h)]
    by_hand = {i: collections.Counter() for i in range(settings.layers)}
    moe.eval()
    with torch.no_grad():
        for d, ids in enumerate(windows.values()):
            for row in ids:
                moe(input_ids=row[None])
                for layer, x in inputs.items():
                    router = moe.transformer.h[layer].mlp.router
                    chosen = (x.double() @ router.weight.double().T).topk(settings.num_experts_per_tok, -1).indices
                    for expert in chosen.reshape(-1).tolist():
                        by_hand[layer][(d, expert)] += 1
    for hook in hooks:
        hook.remove()
    for layer in range(settings.layers):
        expected = np.zeros((3, settings.num_experts), np.int64)
        for (d, e), n in by_hand[layer].items():
            expected[d, e] = n
        np.testing.assert_array_equal(counts[layer], expected)

    atlas = DomainAtlas.from_counts(corpus.domains, counts)
    for layer in atlas.layers:
        c = np.array(layer.counts, dtype=float)
        np.testing.assert_allclose(layer.expert_share_of_domain, c / c.sum(1, keepdims=True))
        np.testing.assert_allclose(np.array(layer.domain_share_of_expert).sum(0)[c.sum(0) > 0], 1.0)
        assert layer.mutual_information == pytest.approx(mutual_information_bits(c))
        assert layer.domain_entropy == pytest.approx(math.log2(3))  # equal windows per domain
    assert any("I(domain; expert)" in line for line in atlas.lines())


# -- the race's readings -------------------------------------------------------------------------------------------

def test_equal_seconds_and_the_exchange_rate_read_off_the_curves_by_hand():
    # dense: loss 4, 3, 2.5, 2.2 at 0, 100, 200, 300 tokens, 1 s a step of 100 tokens; MoE: 4, 2.8, 2.3, 2.1,
    # 1.5 s a step. (One domain, so the mean is that domain.)
    dense, moe = [4.0, 3.0, 2.5, 2.2], [4.0, 2.8, 2.3, 2.1]
    result = RaceResult(settings={}, flops_per_token={}, parameters={}, evaluations=[
        Evaluation(i, 100 * i, {"dense": 1.0 * i, "moe": 1.5 * i}, {"dense": {"x": dense[i]}, "moe": {"x": moe[i]}})
        for i in range(4)], step_seconds={"dense": [1.0] * 8, "moe": [1.5] * 8})
    assert result.step_cost().median == pytest.approx(1.5)
    finish, timed = result.at_equal_time()
    assert finish == 3.0  # the dense model's last evaluation
    assert timed["dense"]["x"] == 2.2
    assert timed["moe"]["x"] == pytest.approx(2.8 + (2.3 - 2.8) * (3.0 - 1.5) / 1.5)  # MoE at 2 evaluations = 3 s
    # MoE at 200 tokens (2.3) is reached by the dense model between 200 (2.5) and 300 (2.2): 200 + 100 * 0.2/0.3
    step, rate = result.token_exchange_rate()
    assert step == 2 and rate == pytest.approx((200 + 100 * (0.2 / 0.3)) / 200)


def test_a_tiny_race_trains_both_on_the_same_batches_and_scores_every_domain():
    settings = RaceSettings(**TINY, steps=4, eval_every=2, warmup_steps=1, dtype="fp32")
    result, models = run_race(settings, tiny_corpus())
    assert [e.step for e in result.evaluations] == [0, 2, 4]
    assert [e.tokens for e in result.evaluations] == [0, 2 * 6 * 16, 4 * 6 * 16]
    assert all(len(v) == 4 and min(v) > 0 for v in result.step_seconds.values())
    first = result.evaluations[0].val
    assert set(first) == {"dense", "moe"} and set(first["dense"]) == {"upper", "digits", "lower"}
    # at step 0 an untrained byte model is near uniform: ln 256 nats per byte
    assert all(abs(v - math.log(256)) < 0.5 for contender in first.values() for v in contender.values())
    assert all(result.evaluations[-1].val[c]["digits"] < first[c]["digits"] for c in ("dense", "moe"))
    assert set(result.test["moe"]) == {"upper", "digits", "lower"}
    assert result.flops_per_token["moe"] / result.flops_per_token["dense"] == pytest.approx(1.0, abs=0.05)


# -- the command ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--experts", "1"], "--experts must be >= 2"),
    (["--experts", "2", "--top-k", "3"], "num_experts_per_tok (top_k) = 3 must be <= num_experts (2)"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--width", "30"], "width 30 is not divisible by heads 4"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--moe-lr", "0"], "--moe-lr must be > 0"),
    (["--dtype", "fp16"], "needs a CUDA device"),
    (["--shared-experts", "-1"], "shared_experts must be a non-negative integer"),
    (["--top-k", "2", "--shared-experts", "1", "--width", "20", "--heads", "4"],
     "does not split into num_experts_per_tok + shared"),
    (["--moe-layers", "every_other", "--layers", "1"], "at least 2 layers"),
    (["--top-k", "1", "--router-gradient", "through-sum"],
     "renormalize_through_sum needs normalize_top_k and num_experts_per_tok >= 2"),
    (["--seeds", "0"], "--seeds must be an integer from 1 to 1000"),
    # issue 44's probes: refused before the corpus or the models are built (a seed torch or numpy cannot take)
    (["--seeds", str(10**20)], "--seeds must be an integer from 1 to 1000, got 100000000000000000000"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2^63 - 1"),
    (["--seed", str(2**70)], "--seed must be an integer from 0 to 2^63 - 1"),
    (["--seed", str(2**63 - 2), "--seeds", "3"], "(with --seeds 3: to 9223372036854775805)"),
])
def test_bad_arguments_are_one_error_line(argv, message, tmp_path, capsys):
    assert main(["race", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "r").exists()


def test_a_race_of_one_contender_matches_its_part_of_the_full_race():
    """Reference: the same contender in the two-contender race (a sweep trains each seed's dense twin once): the
    same batches and schedule give the same losses; the test split is left unread when asked."""
    settings = RaceSettings(**TINY, steps=3, eval_every=3, warmup_steps=1, dtype="fp32")
    both, _ = run_race(settings, tiny_corpus())
    alone, models = run_race(settings, tiny_corpus(), contenders=("moe",), score_test=False)
    assert set(models) == {"moe"} and alone.test == {} and set(alone.step_seconds) == {"moe"}
    for a, b in zip(alone.evaluations, both.evaluations, strict=True):
        assert a.val["moe"] == pytest.approx(b.val["moe"], rel=1e-6)
    with pytest.raises(ConfigError, match="contenders"):
        run_race(settings, tiny_corpus(), contenders=("sparse",))


def test_the_data_seed_moves_the_batches_and_leaves_the_weights():
    """Reference: the race at the seed itself. `data_seed` equal to the seed is the same race; another data seed
    trains the same step-0 weights (the same step-0 losses) on other batches (other losses after)."""
    settings = RaceSettings(**TINY, steps=3, eval_every=3, warmup_steps=1, dtype="fp32")
    plain, _ = run_race(settings, tiny_corpus(), contenders=("dense",), score_test=False)
    same, _ = run_race(dataclasses.replace(settings, data_seed=settings.seed), tiny_corpus(), contenders=("dense",),
                       score_test=False)
    other, _ = run_race(dataclasses.replace(settings, data_seed=settings.seed + 1), tiny_corpus(),
                        contenders=("dense",), score_test=False)
    assert [e.val for e in same.evaluations] == [e.val for e in plain.evaluations]
    assert other.evaluations[0].val == plain.evaluations[0].val
    assert other.evaluations[-1].val != plain.evaluations[-1].val


def test_an_interrupted_race_evaluates_where_it_stopped_and_still_scores_the_test_split():
    # the loop's contract with Ctrl-C (the command passes StopRequest's flag as should_stop)
    settings = RaceSettings(**TINY, steps=10, eval_every=4, warmup_steps=1, dtype="fp32")
    result, _ = run_race(settings, tiny_corpus(), should_stop=lambda: True)
    assert result.stopped == "interrupted at step 1"
    assert [e.step for e in result.evaluations] == [0, 1]
    assert set(result.test) == {"dense", "moe"}


def test_the_router_gradient_setting_reaches_every_router_and_is_saved():
    """Reference: the setting itself (RaceSettings -> the twin's config -> each MoE layer's router); the gradient
    it selects is tested against finite differences in tests/test_moe_layer.py."""
    for given, top_k, through_sum in ((False, 2, False), (True, 2, True), (None, 2, True), (None, 1, False)):
        moe = race_twins(RaceSettings(**{**TINY, "num_experts_per_tok": top_k}, renormalize_through_sum=given))["moe"]
        routers = [block.mlp.router for block in moe.transformer.h if block.is_moe]
        assert routers and all(router.through_sum is through_sum for router in routers)
        assert moe.config.renormalize_through_sum is through_sum


def test_the_race_at_two_seeds_decides_with_the_paired_test(tmp_path, capsys):
    """The command end to end at toy shapes (its own corpus, built offline), two paired seeds. Reference: the
    paired test (contest/seeds.py, tested against scipy) recomputed from the two seeds' saved race.json."""
    import json

    from flash_experts.contest.seeds import paired_test, verdict_words
    from flash_experts.data.text import WIKI_OFFLINE, WIKI_OFFLINE_FILE, installed_data_file

    if installed_data_file(WIKI_OFFLINE[0], WIKI_OFFLINE_FILE) is None:
        pytest.skip(f"{WIKI_OFFLINE[0]} is not installed (requirements-offline.txt): the prose domain")
    out = tmp_path / "race"
    assert main(["race", "--quick", "--seeds", "2", "--seed", "5", "--steps", "4", "--eval-every", "2", "--width", "32",
                 "--heads", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = [json.loads((out / f"seed-{seed}" / "race.json").read_text()) for seed in (5, 6)]
    means = {c: [float(np.mean(list(r["evaluations"][-1]["val"][c].values()))) for r in results] for c in ("dense", "moe")}
    assert f"quality at equal tokens (mean over domains): {verdict_words(paired_test(means['moe'], means['dense']))}" \
        in printed
    assert [r["settings"]["seed"] for r in results] == [5, 6]
    assert all(len(r["step_seconds"]["moe"]) == 4 for r in results)
    assert "Across 2 paired seeds" in printed and "Across seeds: one seed decides nothing" not in printed


def test_the_seed_range_is_what_torch_and_numpy_take_with_room_for_derived_seeds():
    """Reference: the libraries themselves. The largest seed accepted, plus the offsets the main job derives from
    it, seeds torch and numpy; one past it is refused before any work (RaceSettings.check)."""
    from flash_experts.contest.seeds import MAX_SEED

    torch.Generator().manual_seed(MAX_SEED + 1000)
    np.random.default_rng([MAX_SEED + 1000, 799])
    RaceSettings(seed=MAX_SEED).check()
    for bad in (MAX_SEED + 1, -1):
        with pytest.raises(ConfigError, match="seed must be an integer from 0 to 2"):
            RaceSettings(seed=bad).check()
    with pytest.raises(ConfigError, match="data_seed must be"):
        RaceSettings(data_seed=-5).check()


def test_each_twin_takes_its_own_peak_rate():
    """Reference: the settings as written — the MoE twin's schedule peaks at moe_lr, the dense twin's at lr, both
    decaying to min_lr_ratio of their own peak; unset, the MoE takes lr."""
    from flash_experts.contest.race import RaceSettings

    both = RaceSettings(lr=1e-3, moe_lr=1.4e-3, min_lr_ratio=0.1)
    assert (both.optim("dense").lr, both.optim("moe").lr) == (1e-3, 1.4e-3)
    assert both.optim("moe").min_lr == pytest.approx(1.4e-4) and both.optim("dense").min_lr == pytest.approx(1e-4)
    assert RaceSettings(lr=1e-3).optim("moe").lr == 1e-3
