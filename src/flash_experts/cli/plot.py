"""`flash-experts plot RUN_DIR [--out DIR]`: PNG curves and expert-load heatmaps from a run's metrics.jsonl."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot a training run (loss, perplexity, learning rate, expert load) to PNG files",
        description="Read RUN_DIR/metrics.jsonl and write loss/perplexity, learning-rate and expert-load plots.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flash_experts.training.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
