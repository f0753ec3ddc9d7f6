"""The main job's comparison at several seeds: how far the MoE / dense verdict moves from seed to seed.

    python benchmarks/seed_spread.py --seeds 1337 1338 1339 --out runs/seeds-mtg            # the card names
    python benchmarks/seed_spread.py --data wikipedia --seeds 1337 1338 1339 --out runs/seeds-wiki
    python benchmarks/seed_spread.py --quick --base tests/... --out /tmp/seeds              # a smoke run

Each seed runs what `flash-experts demo` runs up to its verdict, with the demo's own defaults and recipe
(`cli/demo.py`: run_config, the equal-compute plan, and `train_interleaved`: the dense model and its upcycled
MoE take turns in one process, each until its measured training-step time reaches --budget). Recorded per
seed, on validation only (the test split is never read here): each model's best validation perplexity,
their ratio, the realized compute of each run, and the MoE's routing at step 0 and at the end (entropy / ln E,
top-1 probability, least and most used expert, the experts' relative distance).

The spread of the ratio over the seeds is the band inside which the demo calls a comparison a tie
(`cli/demo.py` TIE_BAND, docs/UPCYCLING.md "The verdict's band"). Writes <out>/results.json and prints a
Markdown table. Each seed's checkpoints are deleted once its numbers are kept (a SmolLM2 pair is ~3 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description  # noqa: E402


def demo_arguments(extra: list[str]) -> argparse.Namespace:
    """The demo's parsed defaults (plus `extra` demo flags), so that every seed runs the demo's recipe."""
    from flash_experts.cli import demo

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    return parser.parse_args(["demo", *extra])


def prepare(data: str, base: str, out: Path) -> str:
    from flash_experts.cli.demo import prepare_mtg_names
    from flash_experts.model.loading import base_tokenizer

    tokenizer = base_tokenizer(base)
    if data == "mtg":
        return prepare_mtg_names(tokenizer, out / "data")[0]
    from sweep_upcycling import prepare_wikipedia

    return prepare_wikipedia(tokenizer, out / "data")[0]


def one_seed(args: argparse.Namespace, base: str, data_dir: str, seed: int, out: Path) -> dict:
    from flash_experts.cli.demo import RUNS, equal_compute_plan, run_config
    from flash_experts.training.equal_compute import train_interleaved

    demo_args = demo_arguments(["--seed", str(seed), "--budget", str(args.budget), "--wandb", "off",
                                *(["--quick"] if args.quick else []), *args.demo_args])
    seed_dir = out / f"seed-{seed}"
    probe = {name: run_config(demo_args, base, data_dir, seed_dir / name, moe=name == "moe", steps=1)
             for name in RUNS}
    plan = equal_compute_plan(demo_args, probe, seed_dir / "plan.json")
    configs = {}
    for name in RUNS:
        cfg = run_config(demo_args, base, data_dir, seed_dir / name, moe=name == "moe", steps=plan["steps"][name],
                         budget=args.budget)
        cfg.run.quiet, cfg.tracking.tensorboard = True, False
        if args.val_batches:
            cfg.eval.batches = args.val_batches
        configs[name] = cfg
    started = time.perf_counter()
    results = train_interleaved(configs)
    dense, moe = results["dense"], results["moe"]
    record = {
        "seed": seed, "minutes": (time.perf_counter() - started) / 60,
        "dense_val_ppl": dense.best_val_ppl, "moe_val_ppl": moe.best_val_ppl,
        "ratio": moe.best_val_ppl / dense.best_val_ppl,
        "dense_seconds": dense.train_seconds, "moe_seconds": moe.train_seconds,
        "compute_ratio": moe.train_seconds / dense.train_seconds,
        "dense_steps": dense.steps, "moe_steps": moe.steps,
        "routing_start": (moe.initial_routing or {}).get("summary"),
        "routing_end": (moe.final_routing or {}).get("summary"),
    }
    for name in RUNS:  # keep metrics.jsonl and config.yaml, drop the weights
        for folder in ("best", "checkpoints"):
            shutil.rmtree(seed_dir / name / folder, ignore_errors=True)
    return record


def table(records: list[dict]) -> str:
    lines = ["| seed | dense val ppl | MoE val ppl | MoE / dense | realized compute MoE / dense | steps dense / MoE | "
             "MoE entropy / ln E, start -> end | least used expert, end | experts' distance, end |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        start, end = r["routing_start"] or {}, r["routing_end"] or {}
        lines.append(
            f"| {r['seed']} | {r['dense_val_ppl']:.2f} | {r['moe_val_ppl']:.2f} | {r['ratio']:.4f} | "
            f"{r['compute_ratio']:.3f} | {r['dense_steps']} / {r['moe_steps']} | "
            f"{start.get('entropy_ratio', float('nan')):.3f} -> {end.get('entropy_ratio', float('nan')):.3f} | "
            f"{end.get('load_min', float('nan')):.3f} | {end.get('expert_distance', float('nan')):.4f} |")
    ratios = [r["ratio"] for r in records]
    if len(ratios) > 1:
        lines.append("")
        lines.append(f"MoE / dense over {len(ratios)} seeds: mean {statistics.mean(ratios):.4f}, standard deviation "
                     f"{statistics.stdev(ratios):.4f}, range {min(ratios):.4f} - {max(ratios):.4f} "
                     f"(half-range {(max(ratios) - min(ratios)) / 2:.4f})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("mtg", "wikipedia"), default="mtg")
    parser.add_argument("--base", default="auto", help="as the demo's --base")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of training steps per run (the demo's)")
    parser.add_argument("--val-batches", type=int, default=0,
                        help="validation batches per evaluation (0: the demo's, the whole split)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick (one timing round)")
    parser.add_argument("--out", default="runs/seed-spread")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: more demo flags (--dtype fp32, ...)")
    args = parser.parse_args()
    args.demo_args = [a for a in args.demo_args if a != "--"]
    from flash_experts.model.loading import choose_base

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    records = json.loads(results_file.read_text())["records"] if results_file.exists() else []
    base, why = choose_base(args.base)
    print(f"{machine_description()}; base {base} ({why}); data {args.data}; {args.budget:g} s per run", flush=True)
    data_dir = prepare(args.data, base, out)
    for seed in args.seeds:
        if any(r["seed"] == seed for r in records):
            continue  # an earlier invocation measured it
        print(f"seed {seed}", flush=True)
        records.append(one_seed(args, base, data_dir, seed, out))
        results_file.write_text(json.dumps({"data": args.data, "base": base, "budget": args.budget,
                                            "records": records}, indent=1))
        print(table(records[-1:]), flush=True)
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
