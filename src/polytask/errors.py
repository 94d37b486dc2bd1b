"""User-facing errors: one line that says what was wrong and what to do."""

from __future__ import annotations


class PolytaskError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class PolytaskWarning(UserWarning):
    """Something the user should know that did not stop the run (the CLI prints it as one line)."""
