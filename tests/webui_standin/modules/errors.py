"""Stand-in for ``modules/errors.py``: reports are recorded instead of printed."""
from __future__ import annotations

import traceback

reported: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    reported.append(message + ("\n" + traceback.format_exc() if exc_info else ""))


def display(e: Exception, task, *, full_traceback=False):
    reported.append(f"{task}: {type(e).__name__}: {e}")
