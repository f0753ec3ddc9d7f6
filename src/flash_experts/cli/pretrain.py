"""`flash-experts pretrain`: train a small GPT-2 (dense or MoE) from scratch on a prepared data folder.

    flash-experts pretrain --config configs/pretrain_wikipedia.yaml model.n_layer=6 optim.max_steps=5000
    torchrun --nproc_per_node=4 -m flash_experts.cli.main pretrain --config configs/pretrain_wikipedia.yaml

The same trainer as `finetune`, with model.base=scratch (sizes from the model section, vocabulary and
tokenizer from the data folder).
"""

from __future__ import annotations

import argparse

from flash_experts.cli.common import add_training_arguments, run_training


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train a small GPT-2 (dense or MoE) from scratch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_training(args, forced=["model.base=scratch"], verb="pretrain")
