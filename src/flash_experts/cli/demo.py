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
import os
from pathlib import Path
from typing import Any

from flash_experts.cli.common import RenamedOption, training_dtype_word


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


# UpcyclingSettings' fields -> the options that set them (its check names them so)
OPTIONS = {"tokens": "--tokens", "num_experts": "--experts", "num_experts_per_tok": "--top-k",
           "batch_size": "--batch-size", "block_size": "--block-size", "names": "--names", "lr": "--lr",
           "router_lr_scale": "--router-lr-scale", "router_aux_loss_coef": "--aux-loss", "train": "--train",
           "seed": "--seed"}


def settings_from(args: argparse.Namespace) -> Any:
    """UpcyclingSettings from the arguments (--quick's budget and names), checked: one error line for a bad value."""
    from flash_experts.contest.defaults import QUICK_TOKENS
    from flash_experts.contest.upcycling import UpcyclingSettings

    settings = UpcyclingSettings(
        base=args.base, tokens=min(args.tokens, QUICK_TOKENS) if args.quick else args.tokens,
        num_experts=args.experts, num_experts_per_tok=args.top_k, train=args.train, batch_size=args.batch_size,
        block_size=args.block_size, lr=args.lr, router_lr_scale=args.router_lr_scale,
        router_aux_loss_coef=args.aux_loss, names=min(args.names, 20) if args.quick else args.names,
        seed=args.seed, dtype=args.dtype, wandb=args.wandb)
    settings.check(OPTIONS)
    return settings


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from flash_experts.contest.seeds import contest
    from flash_experts.contest.upcycling import PLAN_FILE, check_folders, run_upcycling_contest, seed_folders
    from flash_experts.contest.upcycling_report import seed_rows, summary_lines

    settings = settings_from(args)
    folders = seed_folders(Path(args.out), args.seed, args.seeds)
    check_folders(Path(args.out), folders, args.resume)
    os.environ.setdefault("WANDB_SILENT", "true")  # the summary below says what matters; W&B keeps its files

    def one_seed(seed: int) -> Any:
        folder = folders[seed]
        if args.seeds > 1:
            print(f"=== seed {seed} ({seed - args.seed + 1} of {args.seeds}) -> {folder}", flush=True)
        resume = args.resume and (folder / PLAN_FILE).exists()
        outcome = run_upcycling_contest(dataclasses.replace(settings, seed=seed), folder, resume=resume,
                                        say=lambda line: print(line, flush=True))
        print("\n".join(summary_lines(outcome, folder)))
        return outcome

    seeds = contest(one_seed, args.seed, args.seeds)
    if seeds.verdict is not None:
        print("\n".join(seed_rows(seeds.results) + seeds.verdict.lines("at equal compute")))
    return 0
