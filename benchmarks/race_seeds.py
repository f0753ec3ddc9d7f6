"""The from-scratch race at several seeds and MoE recipes: chosen on validation, the choice scored once on test.

For each seed, the dense twin is trained once and the MoE twin once per recipe (`contest/race.run_race`, the
race `flash-experts race` runs, on its corpus: every run sees the same batches at the same steps). Prints, per
recipe, MoE / dense validation loss at equal tokens (the last evaluation) per domain for each seed, the mean and
standard deviation over seeds, and issue 28's verdict (the MoE at most 0.98x the dense model in every domain at
every seed). The recipe with the lowest mean validation ratio is the choice; only then is the test split read,
for that recipe alone (its MoE and the dense twins, every seed).

    python benchmarks/race_seeds.py [--seeds 1337 1338 1339] [--recipes baseline fine shared every_other]
                                    [--steps 800] [--out runs/race_seeds] [--quick]

`--out` gets race_seeds.json (every run's validation curves, the ratios, the choice and its test split) and
race_recipes.png (MoE / dense against tokens per recipe, the band spanning the seeds).

A recipe is a set of RaceSettings fields over the defaults; each keeps the dense twin's FLOPs per token (the
script prints each one's ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table  # noqa: E402
from flash_experts.contest.plots import plot_race_recipes  # noqa: E402
from flash_experts.contest.race import (  # noqa: E402
    QUICK,
    TARGET_RATIO,
    RaceSettings,
    build_corpus,
    run_race,
    score_on_test,
)
from flash_experts.errors import UserError, report_errors  # noqa: E402
from flash_experts.training.config import resolve_precision  # noqa: E402

RECIPES = {
    "baseline": {},  # 8 experts of 4d/2, top-2, every layer, balancing 0.01, z 0.001, Mixtral's router gradient
    "fine": dict(num_experts=16, num_experts_per_tok=4),  # finer granularity: 16 experts of 4d/4, top-4
    # DeepSeekMoE: 1 shared + top-3 of 16, each 4d/4
    "shared": dict(num_experts=16, num_experts_per_tok=3, shared_experts=1),
    "every_other": dict(moe_layers="every_other"),  # GShard/Switch: MoE in layers 1, 3; dense MLPs elsewhere
    "many": dict(num_experts=16),  # twice the experts at the same FLOPs: 16 of 4d/2, top-2 (Switch: more experts, more params)
    "held_sum": dict(renormalize_through_sum=False),  # the baseline with the Switch router gradient (before 2026-12-04)
    "top1": dict(num_experts_per_tok=1),  # Switch: 8 experts of 4d, top-1 (and its router gradient, the held sum)
    # a tenth of both router losses
    "light_balance": dict(router_aux_loss_coef=0.001, router_z_loss_coef=0.0001),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--recipes", nargs="+", default=["baseline"], choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/race_seeds"), help="folder for the JSON and the PNG")
    parser.add_argument("--quick", action="store_true", help="the race's --quick shapes")
    args = parser.parse_args()
    # every argument checked before any work (the corpus takes a minute to build)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds must be distinct, got {args.seeds}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    base = {**(QUICK if args.quick else {}), **({"steps": args.steps} if args.steps is not None else {})}
    dtype = resolve_precision("auto", "cpu")
    settings = {(name, seed): RaceSettings(**{**base, **RECIPES[name]}, seed=seed, dtype=dtype)
                for name in args.recipes for seed in args.seeds}
    for s in settings.values():
        s.check()
    with tempfile.TemporaryDirectory() as folder:
        corpus = build_corpus(Path(folder), args.quick)
    domains = corpus.domains
    started = time.perf_counter()
    dense, moe, ratios, costs, flops = {}, {}, {}, {}, {}
    for seed in args.seeds:
        result, models = run_race(RaceSettings(**base, seed=seed, dtype=dtype), corpus, contenders=("dense",),
                                  score_test=False)
        dense[seed] = (result, models["dense"])
        for name in args.recipes:
            result, models = run_race(settings[(name, seed)], corpus, contenders=("moe",), score_test=False)
            moe[(name, seed)] = (result, models["moe"])
            dense_val, moe_val = dense[seed][0].evaluations[-1].val["dense"], result.evaluations[-1].val["moe"]
            ratios[(name, seed)] = {d: moe_val[d] / dense_val[d] for d in domains}
            dense_seconds, moe_seconds = (sum(r.step_seconds[c]) for r, c in ((dense[seed][0], "dense"), (result, "moe")))
            costs[(name, seed)] = moe_seconds / dense_seconds
            flops[name] = result.flops_per_token["moe"] / dense[seed][0].flops_per_token["dense"]
            print(f"seed {seed} {name}: " + ", ".join(f"{d} {v:.4f}" for d, v in ratios[(name, seed)].items())
                  + f"; {(time.perf_counter() - started) / 60:.0f} min", flush=True)

    print(f"\n## The race's recipes at {len(args.seeds)} seeds: MoE / dense validation loss at equal tokens\n")
    first = settings[(args.recipes[0], args.seeds[0])]
    print(f"- machine: {machine_description()}; {first.steps} steps each ({first.steps * first.batch_size * first.context / 1e6:.2f}M "
          f"bytes), {dtype}; {(time.perf_counter() - started) / 60:.1f} min in all")
    print("- step-cost ratios here are each MoE's training seconds over its seed's dense run, not interleaved: "
          "indicative only (benchmarks/bench_race_step.py interleaves)\n")
    rows, means = [], {}
    for name in args.recipes:
        for seed in args.seeds:
            rows.append([name, seed, *(f"{ratios[(name, seed)][d]:.4f}" for d in domains),
                         f"{costs[(name, seed)]:.2f}x"])
        per_domain = {d: [ratios[(name, seed)][d] for seed in args.seeds] for d in domains}
        means[name] = statistics.mean(statistics.mean(v) for v in per_domain.values())
        rows.append([f"**{name}** mean ± sd", "",
                     *(f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}"
                       for v in per_domain.values()),
                     f"{statistics.mean(costs[(name, seed)] for seed in args.seeds):.2f}x"])
    print(markdown_table(["recipe", "seed", *domains, "MoE s / dense s"], rows))
    print("\nRecipes (FLOPs per token / the dense twin's):")
    for name in args.recipes:
        print(f"- {name}: {settings[(name, args.seeds[0])].recipe_words()} ({flops[name]:.3f}x)")
    for name in args.recipes:
        worst = {d: max(ratios[(name, seed)][d] for seed in args.seeds) for d in domains}
        met = all(w <= TARGET_RATIO for w in worst.values())
        print(f"Target ({name}): MoE <= {TARGET_RATIO} x dense in every domain at every seed: "
              f"{'met' if met else 'NOT met'} (worst seed per domain: "
              f"{', '.join(f'{d} {w:.4f}' for d, w in worst.items())})")

    chosen = min(means, key=means.get)
    print(f"\nChosen on validation (lowest mean ratio over domains and seeds): **{chosen}** ({means[chosen]:.4f}). "
          f"Its test split, read once:\n")
    rows, tests = [], {}
    for seed in args.seeds:
        s = settings[(chosen, seed)]
        tests[seed] = score_on_test({"dense": dense[seed][1], "moe": moe[(chosen, seed)][1]}, s, corpus)
        rows.append([seed, *(f"{tests[seed]['moe'][d] / tests[seed]['dense'][d]:.4f}" for d in domains)])
    print(markdown_table(["seed", *(f"{d}: MoE / dense" for d in domains)], rows))

    args.out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for name in args.recipes:
        per_seed = []
        for seed in args.seeds:
            dense_curve, moe_curve = dense[seed][0].evaluations, moe[(name, seed)][0].evaluations
            per_seed.append([statistics.mean(m.val["moe"][d] / n.val["dense"][d] for d in domains)
                             for n, m in zip(dense_curve, moe_curve, strict=True)])
        curves[name] = ([e.tokens for e in dense[args.seeds[0]][0].evaluations], per_seed)
    png = plot_race_recipes(curves, args.out / "race_recipes.png",
                            f"the race's recipes from scratch, {first.steps} steps, seeds {', '.join(map(str, args.seeds))}")
    record = {
        "steps": first.steps, "seeds": args.seeds, "recipes": {n: RECIPES[n] for n in args.recipes},
        "validation_ratio": {f"{n}/{seed}": r for (n, seed), r in ratios.items()},
        "seconds_ratio": {f"{n}/{seed}": c for (n, seed), c in costs.items()},
        "curves": {"dense": {seed: dense[seed][0].as_dict() for seed in args.seeds},
                   "moe": {f"{n}/{seed}": r.as_dict() for (n, seed), (r, _) in moe.items()}},
        "chosen": chosen, "test": {seed: t for seed, t in tests.items()},
    }
    (args.out / "race_seeds.json").write_text(json.dumps(record, indent=1))
    print(f"\n{args.out / 'race_seeds.json'} and {png}")


if __name__ == "__main__":
    sys.exit(report_errors(main))
