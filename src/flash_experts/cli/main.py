"""`flash-experts <verb>`: argument parsing and error reporting only.

Each verb lives in its own module of this package and exposes `register(subparsers)`, which adds its
sub-parser and sets `func=callable(args) -> int | None`. Heavy imports happen inside those callables so
that `--help` stays instant. Errors become one-line messages in one place, flash_experts/errors.py `report_errors`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Before anything imports torch (it reads THP_MEM_ALLOC_ENABLE once, libgomp its wait policy when it loads): keep
# training's memory in the process between steps (huge pages, malloc's reuse) and let OpenMP's waiting threads
# sleep instead of spinning on a busy machine (cpu_memory.py says why; BENCHMARKS.md measures both).
from flash_experts.cpu_memory import keep_cpu_memory_between_steps, share_cores_while_waiting  # noqa: E402

keep_cpu_memory_between_steps()
share_cores_while_waiting()

from flash_experts.errors import report_errors  # noqa: E402, F401 (the examples' and tests' entry too)

# The verbs, in the order `--help` lists them.
VERB_MODULES = [
    "demo",
    "race",
    "prepare_data",
    "pretrain",
    "finetune",
    "upcycle",
    "generate",
    "generate_names",
    "generate_cards",
    "evaluate",
    "compare",
    "export",
    "plot",
    "studio",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line (exit 2) like every other error, not usage + message.
    Sub-parsers inherit the class, so this covers every verb."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="flash-experts",
        description="GPT-2 -> Mixture-of-Experts with Flash Attention: prepare data, fine-tune, generate, compare.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"flash_experts.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    return report_errors(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
