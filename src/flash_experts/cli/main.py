"""`flash-experts <verb>`: argument parsing and error reporting only.

Each verb lives in its own module of this package and exposes `register(subparsers)`, which adds its
sub-parser and sets `func=callable(args) -> int | None`. Heavy imports happen inside those callables so
that `--help` stays instant. This file is the one place where errors become one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable

# Before anything imports torch (it reads THP_MEM_ALLOC_ENABLE once): keep training's memory in the process
# between steps, huge pages and malloc's reuse (cpu_memory.py says why; BENCHMARKS.md measures it).
from flash_experts.cpu_memory import keep_cpu_memory_between_steps  # noqa: E402

keep_cpu_memory_between_steps()

from flash_experts.errors import UserError  # noqa: E402

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
    "evaluate",
    "compare",
    "export",
    "plot",
    "studio",
]

# Errors that are the user's to fix: shown as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,  # ConfigError included
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    json.JSONDecodeError,
)


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


def report_errors(func: Callable[[], int | None], debug: bool = False) -> int:
    """Run `func` and turn what it raises into the command line's exit codes: a user's error is one `error:`
    line and 2, anything else one line and 1, Ctrl-C 130. The example scripts go through here too, so a
    script and a verb report the same failure the same way. `--debug` or FLASH_EXPERTS_DEBUG=1 re-raise."""
    debug = debug or os.environ.get("FLASH_EXPERTS_DEBUG") == "1"
    try:
        result = func()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the CLI must never end in a traceback
        if debug:
            raise
        print(
            f"error: {type(error).__name__}: {_one_line(error)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return int(result or 0)


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and error.filename:
        text = f"{error.strerror or text}: {error.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
