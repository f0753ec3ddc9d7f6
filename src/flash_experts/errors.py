"""The error types for everything a user can get wrong.

Library code raises `UserError` (or its `ConfigError` for an invalid setting or argument value) with a
message that makes sense on its own; the CLI turns them into one line on stderr and exit code 2. A plain
`ValueError` is not one of them: raised inside torch or a library it is a bug, and the CLI says so (exit 1).
`report_errors` is that turning, shared by the command line and the example scripts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user: missing files, wrong formats, impossible settings."""


class ConfigError(UserError, ValueError):
    """An invalid setting or argument value (a config field, a keyword argument). Also a ValueError, so code
    that calls the library and catches ValueError for bad values keeps working."""


class NonFiniteOutput(UserError):
    """A model's logits or loss hold NaN or inf (e.g. a checkpoint with NaN weights): a number computed from
    them would be meaningless, so the measurement stops and names the model."""

    def __init__(self, model: object, what: str) -> None:
        name = getattr(model, "name_or_path", "") or type(model).__name__
        super().__init__(f"the model {name} produced non-finite {what} (NaN or inf): its weights are damaged "
                         "or it overflows in this precision; nothing was measured")


# Errors that are the user's to fix: shown as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,  # ConfigError included
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    json.JSONDecodeError,
)


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
