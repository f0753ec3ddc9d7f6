"""One error type for everything a user can get wrong.

Library code raises `UserError` (or `ValueError` for invalid configuration values) with a message that
makes sense on its own; the CLI turns either into one line on stderr and a non-zero exit.
"""


class UserError(Exception):
    """Bad input from the user: missing files, wrong formats, impossible settings."""


class NonFiniteOutput(UserError):
    """A model's logits or loss hold NaN or inf (e.g. a checkpoint with NaN weights): a number computed from
    them would be meaningless, so the measurement stops and names the model."""

    def __init__(self, model: object, what: str) -> None:
        name = getattr(model, "name_or_path", "") or type(model).__name__
        super().__init__(f"the model {name} produced non-finite {what} (NaN or inf): its weights are damaged "
                         "or it overflows in this precision; nothing was measured")
