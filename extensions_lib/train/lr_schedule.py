"""The WebUI's learning-rate schedule syntax: ``"0.005:100, 1e-3:1000, 1e-5"``.

Each comma-separated entry is ``rate:step`` — use `rate` until the optimizer has made `step` updates —
or a bare ``rate`` (also ``rate:-1``), which lasts until max steps and ends the schedule. Steps are
clamped to max steps and entries after the first one that reaches past max steps are never used. Once
the step count reaches the end of the last entry the schedule is *exhausted* and training stops there,
even below max steps (the WebUI's rule: ``"0.005:100"`` with max steps 1000 trains 100 steps).

The same syntax schedules the gradient-clipping value; a clip schedule keeps its last value instead of
ending training.

Unlike the WebUI we reject what it would silently mis-handle: steps that do not increase, negative
steps other than -1, entries after a bare rate (it ignores them), and non-finite or negative rates.
Because steps increase, the value at a step depends on nothing but the step, so a resumed run sees
exactly the rates of an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import AlchemyError

_EXAMPLE = "write it like '0.005:100, 1e-3:1000, 1e-5' (0.005 until step 100, 1e-3 until 1000, then 1e-5)"


@dataclass(frozen=True)
class Schedule:
    """Parsed schedule: ``entries[i] = (value, end_step)``; the value holds while ``step < end_step``."""

    entries: tuple[tuple[float, int], ...]
    text: str

    @property
    def end_step(self) -> int:
        """The step at which the schedule is exhausted (training stops here)."""
        return self.entries[-1][1]

    def value_at(self, step: int) -> float | None:
        """Value for the optimizer update made at `step` (0 = first update); None once exhausted."""
        for value, end in self.entries:
            if step < end:
                return value
        return None

    def value_or_last(self, step: int) -> float:
        """Like :meth:`value_at` but keeping the last value after the end (clip-value schedules)."""
        value = self.value_at(step)
        return self.entries[-1][0] if value is None else value


def parse_schedule(text: str, max_steps: int, *, option: str = "learn_rate") -> Schedule:
    """Parse `text` for a run of `max_steps` updates; AlchemyError naming the bad entry otherwise."""
    if max_steps < 1:
        raise AlchemyError(f"option max steps must be at least 1 to use schedule {text!r}")
    entries: list[tuple[float, int]] = []
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise AlchemyError(f"option {option} is empty", fix=_EXAMPLE)
    previous_end, previous = 0, ""
    for part in parts:
        if not part:
            continue  # "0.1:10, , 1e-3" and a trailing comma are harmless, as in the WebUI
        if entries and _is_open_ended(previous):
            raise AlchemyError(f"option {option}: entry {part!r} comes after {previous!r}, which already "
                               "lasts until max steps", fix="remove it, or give the entry before it a ':step'")
        value, step = _parse_entry(part, option)
        if step != -1 and step <= previous_end:
            raise AlchemyError(f"option {option}: entry {part!r} ends at step {step}, not after the previous "
                               f"entry's step {previous_end}", fix="steps must increase from left to right")
        # Entries after one that reaches max steps can never apply (but are still checked above).
        if not entries or entries[-1][1] < max_steps:
            entries.append((value, max_steps if step == -1 else min(step, max_steps)))
        previous_end, previous = (step if step != -1 else max_steps), part
    if not entries:
        raise AlchemyError(f"option {option} has no usable entry in {text!r}", fix=_EXAMPLE)
    return Schedule(tuple(entries), str(text))


def _is_open_ended(part: str) -> bool:
    pieces = part.split(":")
    return len(pieces) == 1 or pieces[1].strip() == "-1"


def _parse_entry(part: str, option: str) -> tuple[float, int]:
    pieces = part.split(":")
    if len(pieces) > 2:
        raise AlchemyError(f"option {option}: entry {part!r} has more than one ':'", fix=_EXAMPLE)
    try:
        value = float(pieces[0])
    except ValueError:
        raise AlchemyError(f"option {option}: {pieces[0].strip()!r} in entry {part!r} is not a number",
                           fix=_EXAMPLE) from None
    if not math.isfinite(value) or value < 0:
        raise AlchemyError(f"option {option}: rate {pieces[0].strip()!r} in entry {part!r} must be a finite "
                           "number >= 0", fix=_EXAMPLE)
    if len(pieces) == 1:
        return value, -1
    try:
        step = int(pieces[1])
    except ValueError:
        raise AlchemyError(f"option {option}: step {pieces[1].strip()!r} in entry {part!r} is not a whole number",
                           fix=_EXAMPLE) from None
    if step < 1 and step != -1:
        raise AlchemyError(f"option {option}: step {step} in entry {part!r} must be positive (or -1 for "
                           "'until max steps')", fix=_EXAMPLE)
    return value, step
