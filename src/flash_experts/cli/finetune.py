"""`flash-experts finetune`: train a pretrained base (upcycled to MoE when the config has an moe section).

    flash-experts finetune --config configs/mtg_moe.yaml optim.lr=1e-4 data.batch_size=4
    flash-experts finetune --config configs/mtg_moe.yaml --resume            # latest checkpoint of the run
    torchrun --nproc_per_node=2 -m flash_experts.cli.main finetune --config configs/mtg_moe.yaml
"""

from __future__ import annotations

import argparse

from flash_experts.cli.common import add_training_arguments, run_training


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained model (upcycled to Mixture-of-Experts when the config has an moe section)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_training(args, forced=[], verb="finetune")


