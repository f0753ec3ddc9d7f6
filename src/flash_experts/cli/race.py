"""`flash-experts race`: where a Mixture of Experts pays. A small byte-level GPT and its iso-FLOP MoE twin, trained
from scratch on prose, Python source and card names, taking turns on the same batches, set side by side.

    flash-experts race                      # the default race (~15-20 minutes on a 2-core CPU)
    flash-experts race --experts 16 --top-k 4
    flash-experts race --seeds 8            # eight paired seeds, decided by a one-sided paired t-test
    flash-experts race --quick              # a one-minute smoke run of the same pipeline
    torchrun --nproc_per_node=2 -m flash_experts.cli.main race --expert-parallel 2   # the MoE's experts split

1. the corpus, offline: Wikipedia summaries (prose), this Python's standard library (code), MTG card names
   (names), as bytes: at a vocabulary of 256 the MLPs carry the FLOPs;
2. the twins: dense MLP of hidden 4d against E experts of hidden 4d/k, k per byte, every layer (the same
   training FLOPs per token, counted by the models and printed); the same seed, the same batches, the same
   schedule;
3. training on the contest engine (flash_experts/contest), the two taking turns step by step, each step timed;
   validation loss per domain at every evaluation, so the two are compared at equal tokens exactly;
4. the result: per domain at equal tokens, at equal seconds, and on the test split (scored once); the step cost
   with its spread, the exchange rate and the answer per second; which experts took which domain; a PNG of loss
   against tokens and against seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from flash_experts.cli.common import training_dtype_word


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "race",
        help="from scratch: a small dense GPT against its iso-FLOP MoE twin on prose, code and card names",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/race", help="folder for the corpus, race.json, the atlas and the PNG")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each twin (default 800)")
    parser.add_argument("--experts", type=int, default=None, help="experts per layer (default 8)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="routed experts per byte (default 2); each expert's hidden size is 4 x width / (top-k + "
                             "shared experts)")
    parser.add_argument("--shared-experts", type=int, default=None,
                        help="experts every byte goes through beside its routed ones (DeepSeekMoE; default 0)")
    parser.add_argument("--moe-layers", choices=("all", "every_other"), default=None,
                        help="MoE in every layer (default) or every other (layers 1, 3, ...; the others dense)")
    parser.add_argument("--width", type=int, default=None, help="model width d (default 256)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads, dividing the width (default 4)")
    parser.add_argument("--aux-loss", type=float, default=None, help="Switch balancing loss weight (default 0.01)")
    parser.add_argument("--z-loss", type=float, default=None, help="router z-loss weight (default 0.001)")
    parser.add_argument("--router-gradient", choices=("held-sum", "through-sum"), default=None,
                        help="how the router learns from the top-k weights' renormalising sum: differentiated (HF "
                             "Mixtral's gradient; the default for top-k >= 2) or held constant (the Switch gradient; "
                             "the default for top-1)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of both (default 2e-3)")
    parser.add_argument("--moe-lr", type=float, default=None, help="the MoE twin's own peak rate (default: --lr)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 50)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--seeds", type=int, default=1,
                        help="paired seeds to run, from --seed on (default 1); two or more are decided by a one-sided "
                             "paired t-test at p < 0.01")
    parser.add_argument("--dtype", type=training_dtype_word, default="auto", metavar="{auto,fp32,bf16}",
                        help="auto = bf16 autocast where the CPU computes bf16 natively, else fp32")
    parser.add_argument("--quick", action="store_true", help="tiny twins, 60 steps: checks the pipeline in a minute")
    parser.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                        help="under torchrun: split the MoE twin's experts over groups of N processes (N divides the "
                             "experts and the processes; each process takes its share of every batch); default 1")
    parser.set_defaults(func=run)


# the command line's words -> RaceSettings' (MoESettings') names
OPTION_FIELDS = {"steps": "steps", "experts": "num_experts", "top_k": "num_experts_per_tok",
                 "shared_experts": "shared_experts", "moe_layers": "moe_layers", "width": "width", "layers": "layers",
                 "heads": "heads", "aux_loss": "router_aux_loss_coef", "z_loss": "router_z_loss_coef", "lr": "lr",
                 "moe_lr": "moe_lr", "eval_every": "eval_every"}


def race_settings(args: argparse.Namespace):
    """RaceSettings from the arguments (the quick shapes under --quick); raises UserError on a bad value."""
    from flash_experts.contest.race import QUICK, RaceSettings
    from flash_experts.errors import UserError
    from flash_experts.training.config import resolve_precision

    if args.dtype == "fp16":
        raise UserError("--dtype fp16 needs a CUDA device; the race runs on the CPU: use bf16 or fp32")
    given = {field: getattr(args, option) for option, field in OPTION_FIELDS.items() if getattr(args, option) is not None}
    if args.router_gradient is not None:
        given["renormalize_through_sum"] = args.router_gradient == "through-sum"
    settings = RaceSettings(**{**(QUICK if args.quick else {}), **given}, seed=args.seed,
                            dtype=resolve_precision(args.dtype, "cpu"))
    if settings.num_experts < 2:
        raise UserError(f"--experts must be >= 2 for a Mixture of Experts, got {settings.num_experts}")
    settings.check({"seed": "--seed", **{field: "--" + option.replace("_", "-")
                                          for option, field in OPTION_FIELDS.items()}})
    return settings


def run(args: argparse.Namespace) -> int:
    import contextlib
    import os

    from flash_experts.errors import UserError
    from flash_experts.training import distributed as dist_utils
    from flash_experts.training.processes import ProcessLayout

    settings = race_settings(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if args.expert_parallel < 1:
        raise UserError(f"--expert-parallel must be >= 1, got {args.expert_parallel}")
    if args.expert_parallel > 1 and not dist_utils.launched_by_torchrun():
        raise UserError(f"--expert-parallel {args.expert_parallel} splits the experts over processes: run the race "
                        f"under torchrun with a multiple of {args.expert_parallel} processes")
    info = dist_utils.init_distributed("cpu")
    processes = ProcessLayout(info.rank, info.world_size, args.expert_parallel)
    processes.check(settings.num_experts, settings.batch_size)  # every process refuses alike, before any collective
    try:
        with contextlib.ExitStack() as quiet:
            if not info.is_main:  # one process prints and writes
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            return run_seeds(args, settings, out, processes)
    finally:
        dist_utils.teardown()


def run_seeds(args: argparse.Namespace, settings: Any, out: Path, processes: Any) -> int:
    from flash_experts.contest.race import build_corpus
    from flash_experts.contest.race_report import race_seed, seed_rows, summary_lines
    from flash_experts.contest.seeds import contest

    started, corpora = time.perf_counter(), []

    def one_seed(seed: int) -> Any:
        if not corpora:  # built at the first seed: `contest` checks the seeds before any work
            print("[1/4] the corpus: Wikipedia summaries (prose), the Python standard library (code), MTG card names "
                  "(names), as bytes", flush=True)
            corpora.append(build_corpus(out / "data", args.quick, save=processes.rank == 0))
            print("      train/val/test bytes: " + ", ".join(
                f"{d} {len(s['train']) / 1e6:.2f}M/{len(s['val']) / 1e3:.0f}K/{len(s['test']) / 1e3:.0f}K"
                for d, s in corpora[0].streams.items()), flush=True)
        folder = out if args.seeds == 1 else out / f"seed-{seed}"
        if args.seeds > 1:
            print(f"=== seed {seed} ({seed - args.seed + 1} of {args.seeds}) -> {folder}", flush=True)
        result = race_seed(dataclasses.replace(settings, seed=seed), corpora[0], folder,
                           say=lambda line: print(line, flush=True), processes=processes)
        print("\n".join(summary_lines(result, corpora[0].domains, one_seed=args.seeds == 1)))
        return result

    seeds = contest(one_seed, args.seed, args.seeds)
    if seeds.verdict is not None:
        print("\n".join(seed_rows(seeds.results, corpora[0].domains)
                        + seeds.verdict.lines("at equal tokens (mean over domains)")))
    last = seeds.results[-1].stopped
    print(f"\nrace.json, race.png and the corpus in {out}; {(time.perf_counter() - started) / 60:.1f} min in all"
          f"{'; ' + last if last != 'finished' else ''}")
    return 0
