"""The verdict across seeds: is the MoE better than its dense twin beyond what another seed would change?

One seed decides little: the race's MoE was 0.94x its twin at one seed and 1.07x at another (issue 35), a
spread larger than the effect. `--seeds N` runs N paired seeds (each seed's two contenders share their data
order and start) and decides with a one-sided paired t-test on the log of the loss ratios at p < ALPHA, the
rule public training-speed records are accepted by (a new record's runs must beat the old at p < 0.01);
otherwise the verdict is "no difference shown at N seeds". The statistics are written out here (the Student t
distribution through the regularized incomplete beta function), tested against scipy.

With one seed there is no test: the output quotes the band of ratios measured at five seeds or more
(`MEASURED_BANDS`) and where it comes from, so a single run is read against the spread it lives in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.01
# A seed draws with torch (manual_seed: up to 2^64 - 1) and numpy (default_rng: non-negative), and the main job
# derives more from it (names sampled at seed + 1, + round): 2^63 - 1 leaves them all room. Runs of more seeds
# than MAX_SEEDS take minutes each times a number no machine finishes: refused.
MAX_SEED = 2**63 - 1
MAX_SEEDS = 1000


def check_seeds(first: int, count: int, option: str = "--seed") -> None:
    """One ConfigError, before any work, unless seeds first ... first + count - 1 are all seeds the libraries
    take and count is 1 ... MAX_SEEDS."""
    from flash_experts.errors import ConfigError

    if not isinstance(count, int) or not 1 <= count <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be an integer from 1 to {MAX_SEEDS}, got {count!r}")
    if not isinstance(first, int) or first < 0 or first + count - 1 > MAX_SEED:
        last = "" if count == 1 else f" (with --seeds {count}: to {MAX_SEED - count + 1})"
        raise ConfigError(f"{option} must be an integer from 0 to 2^63 - 1 = {MAX_SEED}{last}, got {first!r}")


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by the continued fraction of Numerical Recipes (`betacf`, modified Lentz), on the side of x
    where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction / a


def student_t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(dof / (dof + t * t), dof / 2, 0.5)  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


@dataclass(frozen=True)
class PairedTest:
    """A one-sided paired t-test of the MoE's log loss against its dense twin's, over seeds."""

    seeds: int
    mean_log_ratio: float  # mean over seeds of ln(MoE loss / dense loss): < 0 where the MoE is better
    t: float
    p_moe_better: float  # one-sided: H1 the MoE's loss is lower
    p_dense_better: float  # one-sided: H1 the dense model's loss is lower

    @property
    def mean_ratio(self) -> float:
        """The geometric mean of the MoE / dense loss ratios."""
        return math.exp(self.mean_log_ratio)


def paired_test(moe: list[float], dense: list[float]) -> PairedTest:
    """The paired t-test on d_i = ln(moe_i) - ln(dense_i): t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of
    freedom. Needs two seeds or more."""
    if len(moe) != len(dense) or len(moe) < 2:
        raise ValueError(f"a paired test needs two or more pairs, got {len(moe)} and {len(dense)} values")
    d = [math.log(m) - math.log(x) for m, x in zip(moe, dense)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(n))
    below = student_t_cdf(t, n - 1)
    return PairedTest(n, mean, t, p_moe_better=below, p_dense_better=1.0 - below)


def verdict_words(test: PairedTest, alpha: float = ALPHA) -> str:
    """The quality verdict in words, from the test."""
    where = (f"one-sided paired t-test over {test.seeds} seeds, MoE / dense loss {test.mean_ratio:.3f} "
             f"(geometric mean), p = {test.p_moe_better:.2g} for the MoE better, {test.p_dense_better:.2g} for the "
             f"dense model better")
    if test.p_moe_better < alpha:
        return f"the MoE is better at p < {alpha:g} ({where})"
    if test.p_dense_better < alpha:
        return f"the dense model is better at p < {alpha:g} ({where})"
    return f"no difference shown at {test.seeds} seeds ({where})"


@dataclass(frozen=True)
class MeasuredBand:
    """MoE / dense loss ratios measured at several seeds of one contest: what one seed's figure is read against."""

    low: float
    high: float
    seeds: tuple[int, ...]
    source: str

    def words(self) -> str:
        return (f"one seed decides nothing: this contest's ratio ranged {self.low:.3f}-{self.high:.3f} over "
                f"{self.source}; --seeds N runs the paired test")


# The bands measured so far, by contest. The race: MoE / dense validation loss at equal tokens, mean over its
# three domains, the default recipe, at seeds 1337-1344 (docs/FROM_SCRATCH.md, "The race across seeds", 2026-12-06;
# two runs of issue 35 whose seed numbers were not recorded, 0.953 and 1.074, lie in the same band's reach).
MEASURED_BANDS: dict[str, MeasuredBand] = {
    "race": MeasuredBand(0.917, 1.045, (1337, 1338, 1339, 1340, 1341, 1342, 1343, 1344),
                         "8 seeds: docs/FROM_SCRATCH.md, 'The race across seeds'"),
    # The demo: MoE / dense best validation loss at equal FLOPs, its defaults, seeds 1337-1341 (`demo --seeds 5`
    # from a fresh clone, 2026-12-06)
    "demo": MeasuredBand(0.967, 1.039, (1337, 1338, 1339, 1340, 1341),
                         "5 seeds (validation loss): README, 'Main job, measured'"),
}


def one_seed_words(contest: str) -> str:
    """What a single seed's output says about the seed-to-seed spread of `contest`."""
    band = MEASURED_BANDS.get(contest)
    if band is None:
        return ("one seed decides nothing, and this contest's seed-to-seed band is not measured yet at five seeds: "
                "--seeds 5 runs the paired test")
    return band.words()
