"""`flash-experts finetune`: train a pretrained base (upcycled to MoE when the config has an moe section).

    flash-experts finetune --config configs/mtg_moe.yaml optim.lr=1e-4 data.batch_size=4
    flash-experts finetune --config configs/mtg_moe.yaml --resume            # latest checkpoint of the run
    torchrun --nproc_per_node=2 -m flash_experts.cli.main finetune --config configs/mtg_moe.yaml
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained model (upcycled to Mixture-of-Experts when the config has an moe section)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=1e-4 moe=null"
    )
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="PATH",
        help="continue a run: a checkpoint or run folder; alone (or 'auto'): the latest checkpoint of run.out_dir, "
        "starting fresh when there is none",
    )


def run(args: argparse.Namespace) -> int:
    return run_training(args, forced=[], verb="finetune")


def run_training(args: argparse.Namespace, forced: list[str], verb: str) -> int:
    """Load the config (forced overrides first, so the user's can be checked against them), train, report."""
    from flash_experts.training.config import load_config
    from flash_experts.training.trainer import train

    overrides, resume = list(args.overrides), args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        overrides.append(resume)  # `--resume optim.lr=1e-4`: argparse took the override for --resume's PATH
        resume = "auto"
    cfg = load_config(args.config, forced + overrides)
    if verb == "pretrain" and cfg.model.base != "scratch":
        from flash_experts.errors import UserError

        raise UserError(
            f"pretrain trains from scratch (model.base=scratch), got model.base={cfg.model.base!r}; use finetune"
        )
    result = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary(result))
    return 0


def _summary(result: Any) -> str:
    def loss(value: float | None, ppl: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f} (ppl {ppl:.2f})"

    best_at = f" at step {result.best_step}" if result.best_step else ""
    lines = [
        f"{result.stopped}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s",
        f"  val loss  final {loss(result.final_val_loss, result.final_val_ppl)}, "
        f"best {loss(result.best_val_loss, result.best_val_ppl)}{best_at}",
        f"  run folder {result.run_dir}",
    ]
    if result.checkpoint:
        lines.append(f"  checkpoint {result.checkpoint}")
    return "\n".join(lines)
