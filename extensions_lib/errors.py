"""One exception type for every problem a user can fix.

Each error names the file (or option) at fault and says what to do about it, so the CLI, the gradio
tab and the HTTP API can show it verbatim instead of a traceback.
"""
from __future__ import annotations

import os


class AlchemyError(Exception):
    """A user-facing error: `what` went wrong with `path`, and `fix` says how to recover."""

    def __init__(self, what: str, path: str | os.PathLike | None = None, fix: str | None = None):
        self.what = what
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.path}: {self.what}" if self.path else self.what
        if self.fix:
            text += f" ({self.fix})"
        return text


class Cancelled(Exception):
    """Raised inside long jobs when the user asked them to stop; callers save what they have."""
