"""`flash-experts demo`: the main job, end to end, offline by default: the dense model and its upcycled MoE,
fine-tuned at equal compute (the same training FLOPs) and set side by side.

    flash-experts demo                       # MTG names: prepare -> base -> dense and MoE at equal compute -> names
    flash-experts demo --tokens 90112 --experts 8 --top-k 2
    flash-experts demo --seeds 5             # five paired seeds, decided by a one-sided paired t-test
    flash-experts demo --quick               # a few-minute smoke run of the same pipeline

The contest runs in the library (flash_experts/contest/upcycling.py); this verb parses and prints. What the
two models learn does not depend on how busy the machine is: the budget is FLOPs, the steps are fixed before
the first one, and the same seed prints the same quality figures to the bit; only the seconds differ.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from flash_experts.cli.common import RenamedOption, training_dtype_word

RUNS = ("dense", "moe")
PLAN_FILE = "plan.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    from flash_experts.contest.defaults import DEFAULT_TOKENS, ROUTER_AUX_LOSS_COEF, ROUTER_LR_SCALE

    parser = subparsers.add_parser(
        "demo",
        help="the main job: MTG names -> base -> dense and upcycled MoE at equal compute -> names, side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", default="auto",
                        help="'auto' (hub gpt2 if reachable, else smollm2), 'smollm2', a hub id or a model folder")
    parser.add_argument("--out", default="runs/demo", help="folder for the data, the two runs and the plan")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"the compute budget, as the dense model's training tokens (default {DEFAULT_TOKENS:,}): "
                             "each model gets the same training FLOPs, counted by the models themselves")
    parser.add_argument("--budget", action=RenamedOption, new="--tokens (the demo compares at equal FLOPs, not seconds)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="paired seeds to run, from --seed on (default 1); two or more are decided by a one-sided "
                             "paired t-test at p < 0.01")
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
                        help="smoke run: 6 steps each, 20 names (checks the pipeline in a few minutes)")
    parser.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> Any:
    """UpcyclingSettings from the arguments (--quick's budget and names); one error line for a bad value."""
    from flash_experts.contest.defaults import QUICK_TOKENS
    from flash_experts.contest.seeds import check_seeds
    from flash_experts.contest.upcycling import UpcyclingSettings
    from flash_experts.errors import UserError

    check_seeds(args.seed, args.seeds)
    for name in ("experts", "top_k", "batch_size", "block_size", "names", "tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts < 2:
        raise UserError(f"--experts must be >= 2 for a Mixture of Experts, got {args.experts}")
    if args.top_k > args.experts:
        raise UserError(f"--top-k ({args.top_k}) cannot exceed --experts ({args.experts})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.router_lr_scale < float("inf"):
        raise UserError(f"--router-lr-scale must be a number > 0, got {args.router_lr_scale}")
    if not 0 <= args.aux_loss < float("inf"):
        raise UserError(f"--aux-loss must be a number >= 0, got {args.aux_loss}")
    return UpcyclingSettings(
        base=args.base, tokens=min(args.tokens, QUICK_TOKENS) if args.quick else args.tokens,
        num_experts=args.experts, num_experts_per_tok=args.top_k, train=args.train, batch_size=args.batch_size,
        block_size=args.block_size, lr=args.lr, router_lr_scale=args.router_lr_scale,
        router_aux_loss_coef=args.aux_loss, names=min(args.names, 20) if args.quick else args.names,
        seed=args.seed, dtype=args.dtype, wandb=args.wandb)


def seed_folders(args: argparse.Namespace) -> dict[int, Path]:
    """Each seed's folder: --out itself for one seed, --out/seed-N for several."""
    out = Path(args.out)
    seeds = range(args.seed, args.seed + args.seeds)
    return {seed: out for seed in seeds} if args.seeds == 1 else {seed: out / f"seed-{seed}" for seed in seeds}


def check_folders(args: argparse.Namespace) -> None:
    """Never overwrite an earlier run; never start fresh where --resume was asked for."""
    from flash_experts.errors import UserError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    for folder in seed_folders(args).values():
        earlier = [folder / name for name in (*RUNS, PLAN_FILE, "run") if (folder / name).exists()]
        if earlier and not args.resume:
            raise UserError(f"{earlier[0]} already holds a run: pass --resume to continue it, or another --out")
    if args.resume and not any((folder / PLAN_FILE).exists() for folder in seed_folders(args).values()):
        raise UserError(f"nothing to resume in {out}: it holds no demo plan ({PLAN_FILE})")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    settings = settings_from(args)
    check_folders(args)
    os.environ.setdefault("WANDB_SILENT", "true")  # the summary below says what matters; W&B keeps its files
    from flash_experts.contest.upcycling import run_upcycling_contest

    outcomes = []
    for seed, folder in seed_folders(args).items():
        if args.seeds > 1:
            print(f"=== seed {seed} ({len(outcomes) + 1} of {args.seeds}) -> {folder}", flush=True)
        resume = args.resume and (folder / PLAN_FILE).exists()
        outcome = run_upcycling_contest(dataclasses.replace(settings, seed=seed), folder, resume=resume,
                                        say=lambda line: print(line, flush=True))
        print_summary(outcome, folder)
        print_routing(outcome)
        outcomes.append(outcome)
    if len(outcomes) > 1:
        print_seeds(outcomes)
    return 0


# ---------------------------------------------------------------------------------------------- printing


def print_summary(outcome: Any, folder: Path) -> None:
    from flash_experts.contest.report import per_second_answer
    from flash_experts.contest.seeds import one_seed_words

    s, results, scores = outcome.settings, outcome.results, outcome.scores
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

    flops = outcome.plan["flops_per_token"]
    rows = [
        ("", "dense", f"MoE ({s.num_experts} experts, top-{s.num_experts_per_tok})"),
        ("val perplexity, step 0", ppl(dense.initial_val_ppl), ppl(moe.initial_val_ppl)),
        ("val perplexity, best", f"{dense.best_val_ppl:.2f} (step {dense.best_step})",
         f"{moe.best_val_ppl:.2f} (step {moe.best_step})"),
        ("test bits per character", f"{scores['dense']['test_bpc']:.4f}", f"{scores['moe']['test_bpc']:.4f}"),
        ("names valid/unique/novel", names("dense"), names("moe")),
        ("names' temperature, top-p", sampling("dense"), sampling("moe")),
        ("steps, tokens", f"{dense.steps}, {dense.tokens:,}", f"{moe.steps}, {moe.tokens:,}"),
        ("training FLOPs", f"{dense.tokens * flops['dense']:.4g}", f"{moe.tokens * flops['moe']:.4g}"),
        ("seconds of training steps", f"{dense.train_seconds:.1f} s", f"{moe.train_seconds:.1f} s"),
        ("wall time, evaluations included", f"{dense.seconds / 60:.1f} min", f"{moe.seconds / 60:.1f} min"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"  base {outcome.base}; equal compute: {outcome.plan['budget'].flops:.4g} training FLOPs each, trained in "
          f"turns on the same batches; MoE layers: every other; MoE trained: {s.train}")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip())
    print(f"  quality at equal compute: MoE / dense validation perplexity {outcome.val_ppl_ratio:.3f} (loss "
          f"{outcome.val_loss_ratio:.4f}); {one_seed_words('demo')}")
    cost = outcome.step_cost()
    if cost is None:
        print("  a MoE step's cost: no step pairs ran in this invocation (resumed after the end)")
    else:
        rate = outcome.exchange_rate()
        print(f"  a MoE step costs {cost} a dense step; exchange rate: "
              + (f"the MoE's result was worth {rate:.2f}x the dense tokens" if rate else "none (the dense model "
                 "never fell to a loss the MoE had reached)"))
        print(f"  per second: {per_second_answer([rate] if rate else None, cost)}")
    png = plot_comparison(outcome, folder)
    print(f"  total time {outcome.minutes:.1f} min; runs {folder / 'dense'}, {folder / 'moe'}; validation vs "
          f"tokens and seconds: {png}")
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


def plot_comparison(outcome: Any, folder: Path) -> Path:
    from flash_experts.training.plots import plot_validation_vs_compute, validation_curve

    curves = {name: validation_curve(folder / name) for name in RUNS}  # x: the seconds each run really spent
    return plot_validation_vs_compute({"dense": curves["dense"], "MoE": curves["moe"]}, folder / "val_vs_compute.png",
                                      f"MTG card names, {Path(outcome.base).name} base, equal FLOPs")


def print_routing(outcome: Any) -> None:
    """The routers (step 0 against the end) and the expert atlas (contest/upcycling.py `routing_lines`)."""
    from flash_experts.contest.upcycling import routing_lines

    print("\n".join(routing_lines(outcome.results["moe"], outcome.atlas)))


def print_seeds(outcomes: list[Any]) -> None:
    """The seeds side by side and the verdict across them."""
    from flash_experts.contest.report import Spread, per_second_answer
    from flash_experts.contest.seeds import paired_test, verdict_words

    print(f"\nAcross {len(outcomes)} paired seeds (validation: the best evaluation of each run; test: scored once):")
    print(f"  {'seed':>6} {'val ppl dense':>14} {'MoE':>8} {'MoE/dense':>10} {'test bpc dense':>15} {'MoE':>8} "
          f"{'step cost':>10} {'exchange':>9}")
    rates, pairs = [], []
    for o in outcomes:
        d, m = o.results["dense"], o.results["moe"]
        cost, rate = o.step_cost(), o.exchange_rate()
        rates.append(rate)
        if cost is not None:
            pairs += [b / a for a, b in zip(o.log.step_seconds["dense"], o.log.step_seconds["moe"])]
        print(f"  {o.settings.seed:>6} {d.best_val_ppl:>14.2f} {m.best_val_ppl:>8.2f} {o.val_ppl_ratio:>10.3f} "
              f"{o.scores['dense']['test_bpc']:>15.4f} {o.scores['moe']['test_bpc']:>8.4f} "
              f"{(f'{cost.median:.3f}x' if cost else 'n/a'):>10} {(f'{rate:.2f}x' if rate else 'none'):>9}")
    test = paired_test([o.results["moe"].best_val_loss for o in outcomes],
                       [o.results["dense"].best_val_loss for o in outcomes])
    print(f"  quality at equal compute: {verdict_words(test)}")
    if pairs:
        cost = Spread.of(pairs)
        print(f"  a MoE step costs {cost} a dense step (all seeds' step pairs)")
        print(f"  per second: {per_second_answer(rates, cost)}")


def _shown(metrics: Any, count: int = 20) -> list[str]:
    return [f"{'new ' if s.is_new else 'real'}  {s.name}" for s in metrics.unique_names()[:count]]
