"""The from-scratch race at several seeds: is the MoE's per-token lead larger than the seed-to-seed spread?

Runs `training/race.run_race` (the race `flash-experts race` runs, on its corpus) once per seed and prints, per
domain, MoE / dense validation loss at equal tokens (the last evaluation) for each seed, their mean and
standard deviation, the step-cost ratio each run measured, and issue 28's verdict: the MoE at most 0.98x the
dense model in every domain at every seed. Validation only: the test split is scored by the race itself, once.

    python benchmarks/race_seeds.py [--seeds 1337 1338 1339] [--steps 800] [--experts 8 --top-k 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table  # noqa: E402
from flash_experts.cli.race import QUICK, TARGET_RATIO, build_corpus  # noqa: E402
from flash_experts.training.config import resolve_precision  # noqa: E402
from flash_experts.training.race import RaceSettings, run_race  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="the race's --quick shapes")
    args = parser.parse_args()
    given = {k: v for k, v in (("steps", args.steps), ("experts", args.experts), ("top_k", args.top_k)) if v}
    with tempfile.TemporaryDirectory() as folder:
        corpus = build_corpus(Path(folder), args.quick)
    rows, ratios, costs = [], {d: [] for d in corpus.domains}, []
    started = time.perf_counter()
    for seed in args.seeds:
        settings = RaceSettings(**{**(QUICK if args.quick else {}), **given}, seed=seed,
                                dtype=resolve_precision("auto", "cpu"))
        result, _ = run_race(settings, corpus)
        last = result.evaluations[-1]
        cost = result.step_cost_ratio()
        costs.append(cost)
        for d in corpus.domains:
            ratios[d].append(last.val["moe"][d] / last.val["dense"][d])
        rows.append([seed, *(f"{ratios[d][-1]:.4f}" for d in corpus.domains), f"{cost:.3f}x"])
        print(f"seed {seed}: {', '.join(f'{d} {ratios[d][-1]:.4f}' for d in corpus.domains)}; step cost {cost:.3f}x",
              flush=True)
    print(f"\n## The race at {len(args.seeds)} seeds: MoE / dense validation loss at equal tokens\n")
    print(f"- machine: {machine_description()}; {settings.steps} steps each, {settings.dtype}; "
          f"{(time.perf_counter() - started) / 60:.1f} min\n")
    spread = [f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}" for v in ratios.values()]
    rows.append(["mean ± sd", *spread, f"{statistics.mean(costs):.3f}x"])
    print(markdown_table(["seed", *corpus.domains, "MoE step / dense"], rows))
    worst = {d: max(v) for d, v in ratios.items()}
    met = all(w <= TARGET_RATIO for w in worst.values())
    print(f"\nTarget: MoE <= {TARGET_RATIO} x dense in every domain at every seed: {'met' if met else 'NOT met'} "
          f"(worst seed per domain: {', '.join(f'{d} {w:.4f}' for d, w in worst.items())})")


if __name__ == "__main__":
    main()
