"""One error type for everything a user can get wrong.

Library code raises `UserError` (or `ValueError` for invalid configuration values) with a message that
makes sense on its own; the CLI turns either into one line on stderr and a non-zero exit.
"""


class UserError(Exception):
    """Bad input from the user: missing files, wrong formats, impossible settings."""
