"""The error types for everything a user can get wrong.

Library code raises `UserError` (or its `ConfigError` for an invalid setting or argument value) with a
message that makes sense on its own; the CLI turns them into one line on stderr and exit code 2. A plain
`ValueError` is not one of them: raised inside torch or a library it is a bug, and the CLI says so (exit 1).
"""


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
