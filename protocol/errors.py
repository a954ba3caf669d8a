"""The one exception type users see: a message saying what went wrong and a hint saying what to run next.

Every package raises `IslesError` for bad input or an unusable environment; the CLI's top-level handler prints it as
`Error: ...` / `Hint: ...` and exits 1 without a traceback.
"""

from __future__ import annotations


class IslesError(Exception):
    """A failure the user can act on. `hint` is the next thing to try (a command, a flag, a file to check)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message
