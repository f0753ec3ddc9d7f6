"""The contest (flash_experts/contest): the engine's turns, the FLOP budget, the report's readings, the verdict's
statistics, and two Trainers taking turns.

References: scripted contenders whose calls are recorded (the turn order, worked out by hand); the budget's
arithmetic by hand; numpy's percentiles and hand-worked curves for the report; scipy (`scipy.special.betainc`,
`scipy.stats.t`, `scipy.stats.ttest_rel`) for the Student t distribution and the paired test; the trainer's own
single-run losses for two trainers taking turns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flash_experts.contest.budget import ComputeBudget, equal_tokens, steps_for_budget
from flash_experts.contest.engine import run_contest
from flash_experts.contest.report import Curve, Spread, at_equal_seconds, exchange_rate, per_second_answer, step_cost
from flash_experts.contest.seeds import (
    contest,
    paired_test,
    regularized_incomplete_beta,
    student_t_cdf,
    student_t_quantile,
    verdict_of,
    verdict_words,
)
from flash_experts.errors import UserError

scipy_special = pytest.importorskip("scipy.special", reason="scipy is the statistics' reference")
scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is the statistics' reference")


class Scripted:
    """A contender that takes `steps` steps, each costing the next of `costs` seconds, and records its turns."""

    def __init__(self, name: str, steps: int, costs: list[float], turns: list[tuple[str, int]]):
        self.name, self.left, self.costs, self.turns = name, steps, list(costs), turns

    @property
    def done(self) -> bool:
        return self.left == 0

    def step(self, index: int) -> float:
        self.turns.append((self.name, index))
        self.left -= 1
        return self.costs.pop(0)


# -- the engine -----------------------------------------------------------------------------------------------

def test_rounds_alternate_who_goes_first_and_a_finished_contender_sits_out():
    turns: list[tuple[str, int]] = []
    contenders = {"a": Scripted("a", 3, [1, 2, 3], turns), "b": Scripted("b", 5, [5, 6, 7, 8, 9], turns)}
    rounds = []
    log = run_contest(contenders, after_round=rounds.append)
    # round 0: a then b; round 1: b then a; round 2: a then b; then b alone, on the same batch indices
    assert turns == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("b", 4)]
    assert rounds == [1, 2, 3, 4, 5]
    assert log.step_seconds == {"a": [1, 2, 3], "b": [5, 6, 7, 8, 9]} and log.stopped == "finished"


def test_a_resumed_contest_starts_at_its_step_and_a_stop_ends_it_after_the_round():
    turns: list[tuple[str, int]] = []
    contenders = {"a": Scripted("a", 4, [1] * 4, turns), "b": Scripted("b", 4, [1] * 4, turns)}
    log = run_contest(contenders, first_step=10, should_stop=lambda: len(turns) >= 4)
    assert turns == [("a", 10), ("b", 10), ("b", 11), ("a", 11)]
    assert log.stopped == "interrupted at step 12" and log.first_step == 10
    # a stop asked for after the last round is no interruption
    turns.clear()
    done = run_contest({"a": Scripted("a", 1, [1], turns)}, should_stop=lambda: True)
    assert done.stopped == "finished"


# -- the budget -----------------------------------------------------------------------------------------------

def test_the_budget_gives_equal_tokens_within_one_percent_and_shares_by_flops_beyond():
    flops = {"dense": 6.0e8, "moe": 6.03e8, "wide": 1.2e9}  # moe +0.5%: equal tokens; wide 2x: half the steps
    budget = ComputeBudget.of_tokens(45_056, "dense", flops)
    assert budget.flops == 45_056 * 6.0e8
    steps = steps_for_budget(budget, flops, tokens_per_step=512)
    assert steps == {"dense": 88, "moe": 88, "wide": 44}  # 45056 / 512 = 88; (88 * 512 * 6e8) / (1.2e9 * 512)
    assert equal_tokens({"dense": 6.0e8, "moe": 6.03e8}) and not equal_tokens(flops)
    tiny = ComputeBudget.of_flops(1.0, "dense", flops)  # less than one step: still one
    assert steps_for_budget(tiny, flops, 512) == {"dense": 1, "moe": 1, "wide": 1}


@pytest.mark.parametrize("tokens", [0, -5, 1.5, float("nan")])
def test_a_token_budget_must_be_a_whole_number_above_zero(tokens):
    with pytest.raises(UserError, match="budget must be a whole number of tokens >= 1"):
        ComputeBudget.of_tokens(tokens, "dense", {"dense": 1.0})


@pytest.mark.parametrize("flops", [0.0, -1.0, float("nan"), float("inf")])
def test_a_flop_budget_must_be_a_finite_number_above_zero(flops):
    with pytest.raises(UserError, match="budget must be a number of FLOPs > 0"):
        ComputeBudget.of_flops(flops, "dense", {"dense": 1.0})


# -- the report -----------------------------------------------------------------------------------------------

def test_step_cost_is_the_median_and_quartiles_of_the_pairs_after_warm_up():
    rng = np.random.default_rng(0)
    dense = rng.uniform(1.0, 2.0, 40)
    moe = dense * rng.uniform(1.1, 1.3, 40)
    moe[:5] *= 10  # warm-up pairs: left out
    cost = step_cost(list(dense), list(moe))
    expected = np.percentile(moe[5:] / dense[5:], [25, 50, 75])
    assert (cost.q1, cost.median, cost.q3, cost.count) == pytest.approx((*expected, 35))
    # too few pairs to drop a warm-up: every pair counts
    assert step_cost([1.0, 1.0], [2.0, 3.0]).median == 2.5
    assert "interquartile" in str(cost)
    with pytest.raises(ValueError):
        step_cost([], [])


def test_equal_seconds_and_the_exchange_rate_by_hand():
    # dense: loss 4, 3, 2.5, 2.2 at 0, 100, 200, 300 tokens, 1 s per 100 tokens; MoE: 4, 2.8, 2.3, 2.1, 1.5 s
    dense = Curve.of([0, 100, 200, 300], [0, 1, 2, 3], [4.0, 3.0, 2.5, 2.2])
    moe = Curve.of([0, 100, 200, 300], [0, 1.5, 3, 4.5], [4.0, 2.8, 2.3, 2.1])
    finish, losses = at_equal_seconds({"dense": dense, "moe": moe})
    assert finish == 3.0 and losses["dense"] == 2.2
    assert losses["moe"] == pytest.approx(2.8 + (2.3 - 2.8) * (3.0 - 1.5) / 1.5)
    # the MoE's 2.3 at 200 tokens: the dense model gets there between 200 (2.5) and 300 (2.2)
    index, rate = exchange_rate(dense, moe)
    assert index == 2 and rate == pytest.approx((200 + 100 * (0.2 / 0.3)) / 200)
    assert exchange_rate(moe, dense) is None  # the other way round, the "MoE" is never ahead


@pytest.mark.parametrize(("rates", "answer"), [
    ([1.40], "pays per second"),
    ([1.40, 1.31, 1.5], "pays per second"),
    ([1.40, 1.20], "even per second within the spreads"),  # the lower seed within the cost's spread
    ([1.05], "does not pay per second"),
    (None, "does not pay per second"),
    ([], "does not pay per second"),
    ([None, None], "does not pay per second"),
    ([1.40, None], "even per second within the spreads"),  # a seed without a lead: "pays" is not said
    ([1.05, None], "does not pay per second"),
    # the main job at five seeds (2026-12-06): one seed with a lead of 1.92x, four without: most do not pay
    ([None, None, 1.92, None, None], "does not pay per second"),
    ([1.40, 1.40, None], "even per second within the spreads"),  # two of three pay, one does not: no majority
    ([1.40, 1.05, 1.10], "does not pay per second"),  # two of three below the cost's lower quartile
])
def test_pays_per_second_only_beyond_both_spreads(rates, answer):
    cost = Spread(median=1.2, q1=1.15, q3=1.25, count=100)
    result = per_second_answer(rates, cost)
    assert result.answer == answer
    if rates and len(rates) == 1:
        assert "not measured" in result.why  # one seed: the exchange rate's own spread is unknown
    assert "1 seeds" not in result.why  # counted in words that agree with the number


def test_the_per_second_answer_counts_the_seeds_that_pay():
    cost = Spread(median=1.2, q1=1.15, q3=1.25, count=100)
    why = per_second_answer([None, None, 1.92, None, None], cost).why
    assert "1.92x the dense tokens at the one seed with a lead" in why
    assert "1 of 5 seeds pay, 4 do not (no lead at 4)" in why


# -- the statistics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("x", "a", "b"), [(0.3, 2.0, 0.5), (0.95, 4.5, 0.5), (0.01, 0.5, 0.5), (0.5, 12.0, 0.5),
                                           (0.999, 1.0, 3.0), (0.0, 2.0, 0.5), (1.0, 2.0, 0.5)])
def test_the_incomplete_beta_function_against_scipy(x, a, b):
    assert regularized_incomplete_beta(x, a, b) == pytest.approx(float(scipy_special.betainc(a, b, x)), rel=1e-10,
                                                                 abs=1e-14)


@pytest.mark.parametrize("dof", [1, 2, 4, 7, 30])
@pytest.mark.parametrize("t", [-6.0, -2.1, -0.3, 0.0, 0.7, 3.4, math.inf, -math.inf])
def test_student_t_against_scipy(t, dof):
    assert student_t_cdf(t, dof) == pytest.approx(float(scipy_stats.t.cdf(t, dof)), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("pairs", [
    ([0.95, 0.96, 0.94, 0.97, 0.955], [1.0, 1.0, 1.01, 0.99, 1.0]),  # the MoE better at every seed
    ([0.942, 0.955, 0.969, 0.953, 1.074], [1.0] * 5),  # the race's five seeds: one seed the other way
    ([1.03, 1.05, 1.02], [1.0, 1.01, 0.99]),  # the dense model better
])
def test_the_paired_test_against_scipy(pairs):
    moe, dense = pairs
    test = paired_test(moe, dense)
    log_moe, log_dense = np.log(moe), np.log(dense)
    less = scipy_stats.ttest_rel(log_moe, log_dense, alternative="less")
    greater = scipy_stats.ttest_rel(log_moe, log_dense, alternative="greater")
    assert test.t == pytest.approx(float(less.statistic), rel=1e-10)
    assert test.p_moe_better == pytest.approx(float(less.pvalue), rel=1e-9)
    assert test.p_dense_better == pytest.approx(float(greater.pvalue), rel=1e-9)
    assert test.mean_ratio == pytest.approx(float(np.exp(np.mean(log_moe - log_dense))))


@pytest.mark.parametrize(("probability", "dof"), [(0.99, 1), (0.99, 7), (0.95, 4), (0.9, 3), (0.01, 12)])
def test_the_t_quantile_against_scipy(probability, dof):
    assert student_t_quantile(probability, dof) == pytest.approx(float(scipy_stats.t.ppf(probability, dof)),
                                                                 rel=1e-9, abs=1e-12)


def test_the_smallest_detectable_difference_is_just_significant():
    """Reference: scipy's t quantile for the formula, and the test itself: seeds whose mean log-ratio is exactly
    the detectable size (with the same spread) sit at p = 0.01; a bit less is not significant, a bit more is."""
    moe, dense = [0.95, 0.96, 0.94, 0.97, 0.955, 0.962, 0.948, 0.951], [1.0] * 8
    test = paired_test(moe, dense)
    d = np.log(moe)
    assert test.sd_log_ratio == pytest.approx(float(np.std(d, ddof=1)), rel=1e-12)
    assert test.detectable() == pytest.approx(float(scipy_stats.t.ppf(0.99, 7)) * np.std(d, ddof=1) / math.sqrt(8))
    for scale, significant in ((0.999, False), (1.0, None), (1.001, True)):
        shifted = np.exp(d - d.mean() - scale * test.detectable())  # the same spread, its mean moved
        p = paired_test(list(shifted), dense).p_moe_better
        if significant is None:
            assert p == pytest.approx(0.01, rel=1e-6)
        else:
            assert (p < 0.01) == significant
    assert "the smallest difference these seeds could show" in verdict_words(test)


class SeedStub:
    """A seed's result as the verdict reads it (seeds.py SeedResult), with figures set by hand."""

    def __init__(self, seed: int, moe: float, pairs: list[float], rate: float | None, stopped: str = "finished"):
        self.seed, self.stopped, self.losses, self.pairs, self.rate = seed, stopped, {"moe": moe, "dense": 1.0}, pairs, rate

    def compared_loss(self, contender: str) -> float:
        return self.losses[contender]

    def step_pairs(self) -> list[float]:
        return self.pairs

    def exchange(self) -> float | None:
        return self.rate


def test_a_contest_runs_its_seeds_in_order_and_decides_across_them():
    """Reference: the paired test and the spread computed here from the stubs' figures."""
    ran = []
    figures = {7: (0.95, [1.1, 1.2], 1.5), 8: (0.97, [1.3], None), 9: (0.96, [1.0, 1.4, 1.2], 1.3)}

    def run_seed(seed: int) -> SeedStub:
        ran.append(seed)
        return SeedStub(seed, *figures[seed])

    seeds = contest(run_seed, 7, 3)
    assert ran == [7, 8, 9] and [r.seed for r in seeds.results] == [7, 8, 9]
    assert seeds.verdict.test == paired_test([0.95, 0.97, 0.96], [1.0] * 3)
    assert seeds.verdict.cost == Spread.of([1.1, 1.2, 1.3, 1.0, 1.4, 1.2])
    assert str(seeds.verdict.per_second) == str(per_second_answer([1.5, None, 1.3], seeds.verdict.cost))
    assert seeds.verdict.lines("at equal tokens")[0].startswith("  quality at equal tokens: ")
    assert contest(run_seed, 8, 1).verdict is None  # one seed: no test


def test_a_contest_stops_after_a_seed_that_did_not_finish_and_checks_its_seeds_first():
    ran = []

    def run_seed(seed: int) -> SeedStub:
        ran.append(seed)
        return SeedStub(seed, 0.9, [1.0], None, stopped="interrupted at step 3" if seed == 2 else "finished")

    seeds = contest(run_seed, 1, 5)
    assert ran == [1, 2] and seeds.results[-1].stopped == "interrupted at step 3"
    ran.clear()
    for first, count in ((-1, 2), (0, 0), (0, 1001), (2**63 - 2, 3)):
        with pytest.raises(UserError, match="--seed|--seeds"):
            contest(run_seed, first, count)
    assert ran == []  # refused before the first seed ran
    assert verdict_of([SeedStub(1, 0.9, [], None), SeedStub(2, 0.95, [], None)]).cost is None  # no pairs ran


def test_the_verdict_says_better_only_at_p_below_the_threshold():
    better = paired_test([0.95, 0.96, 0.94, 0.97, 0.955], [1.0, 1.0, 1.01, 0.99, 1.0])
    assert verdict_words(better).startswith("the MoE is better at p < 0.01")
    spread = paired_test([0.942, 0.955, 0.969, 0.953, 1.074], [1.0] * 5)
    assert verdict_words(spread).startswith("no difference shown at 5 seeds")
    worse = paired_test([1.05, 1.06, 1.04, 1.05], [1.0, 1.0, 1.0, 1.0])
    assert verdict_words(worse).startswith("the dense model is better at p < 0.01")
    with pytest.raises(ValueError, match="two or more"):
        paired_test([0.9], [1.0])


# -- trainers taking turns ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning")
def test_two_trainers_take_turns_and_each_learns_as_it_would_alone(tmp_path, monkeypatch):
    """Reference: each config trained alone by `train` (the same seed, data and schedule): taking turns in one
    process changes nothing a run computes, only when it runs. The turns alternate who goes first."""
    from flash_experts.contest.upcycling import train_contest
    from flash_experts.training import trainer as trainer_module
    from test_trainer import make_data, metrics, tiny_config

    data = make_data(tmp_path / "data")
    settings = {"optim.max_steps": 4, "optim.warmup_steps": 1, "tracking.log_interval": 1, "eval.interval": 2,
                "checkpoint.interval": 0}
    for name in ("a", "b"):  # the reference: each run alone
        trainer_module.train(tiny_config(data, tmp_path / "alone" / name, **settings))
    order = []
    real_step = trainer_module.Trainer.train_step

    def step(self):
        order.append(self.run_dir.name)
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    configs = {name: tiny_config(data, tmp_path / "turns" / name, **settings) for name in ("a", "b")}
    results, log = train_contest(configs, resume=False)
    assert "".join(order) == "abbaabba"
    assert [len(log.step_seconds[n]) for n in ("a", "b")] == [4, 4]
    for name in ("a", "b"):
        assert results[name].steps == 4
        assert metrics(tmp_path / "turns" / name, "train/loss") == metrics(tmp_path / "alone" / name, "train/loss")
        assert metrics(tmp_path / "turns" / name, "val/loss") == metrics(tmp_path / "alone" / name, "val/loss")
        assert sorted(metrics(tmp_path / "turns" / name, "train/tokens")) == [0, 1, 2, 3, 4]


# -- the main job's settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, True])
def test_the_main_jobs_run_config_is_one_the_trainers_own_validation_accepts(moe, monkeypatch, tmp_path):
    """Reference: the trainer's config reader (config_from_dict validates every field): the typed config built
    from checked settings reads back from its plain form unchanged."""
    import flash_experts.data.tokens as tokens
    from flash_experts.contest.upcycling import UpcyclingSettings, run_config
    from flash_experts.training.config import config_from_dict, config_to_dict

    monkeypatch.setattr(tokens, "load_meta", lambda data_dir: {"splits": {"val": {"tokens": 5000}}})
    settings = UpcyclingSettings(num_experts=4, num_experts_per_tok=1, lr=3e-4, dtype="fp32", wandb="off")
    settings.check()
    cfg = run_config(settings, "smollm2", str(tmp_path / "data"), tmp_path / "moe", moe=moe, steps=88)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert (cfg.moe is not None) == moe and cfg.optim.warmup_steps == 8 and cfg.eval.batches == 11


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "fp8", "dtype must be one of auto, fp32, bf16, fp16"),
    ("wandb", "maybe", "wandb must be one of"),
    ("train", "router", "train must be one of all, moe"),
    ("num_experts", 1, "num_experts must be >= 2"),
    ("lr", float("nan"), "lr must be a number > 0"),
    ("seed", -3, "seed must be an integer from 0"),
])
def test_the_main_jobs_settings_are_checked_in_one_place(field, value, message):
    from flash_experts.contest.upcycling import UpcyclingSettings

    with pytest.raises(UserError, match=message):
        UpcyclingSettings(**{field: value}).check()
