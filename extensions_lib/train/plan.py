"""A run's options checked once: :class:`RunPlan` (seed resolved, schedules parsed, clip mode known).

Entry points make the plan before any slow work (the CLI before loading the model), so a bad schedule
is reported at once, and everything after it (the method, the loop) reads the parsed schedules from the
plan instead of parsing the text again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import AlchemyError
from .lr_schedule import Schedule, parse_schedule
from .options import resolve_seed

CLIP_MODES = ("disabled", "value", "norm")


@dataclass(frozen=True)
class RunPlan:
    options: Any
    """The run's :class:`~extensions_lib.train.options.TrainingOptions` (a method's subclass), seed resolved."""
    learn_rate: Schedule
    clip: Schedule | None
    """The gradient-clipping schedule; None when clipping is disabled."""

    @classmethod
    def of(cls, options) -> "RunPlan":
        """The plan of `options`, whose seed must be resolved already (a resumed run's saved one)."""
        if options.seed < 0:
            raise ValueError("resolve the seed first (extensions_lib.train.options.resolve_seed)")
        if options.clip_grad_mode not in CLIP_MODES:
            raise AlchemyError(f"option clip_grad_mode must be disabled, value or norm, got {options.clip_grad_mode!r}")
        clip = None if options.clip_grad_mode == "disabled" else \
            parse_schedule(options.clip_grad_value, options.steps, option="clip_grad_value")
        return cls(options, parse_schedule(options.learn_rate, options.steps, option="learn_rate"), clip)

    @property
    def stop_at(self) -> int:
        """Where the run stops: max steps, or the end of the learning-rate schedule if earlier."""
        return min(self.options.steps, self.learn_rate.end_step)


def plan_run(options_or_plan) -> RunPlan:
    """The plan of a run: `options` with the seed resolved (-1 becomes a random one) and the schedules
    parsed; a plan is returned as it is."""
    if isinstance(options_or_plan, RunPlan):
        return options_or_plan
    return RunPlan.of(resolve_seed(options_or_plan))
