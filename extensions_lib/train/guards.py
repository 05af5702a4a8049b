"""A spike guard beside the loop's NaN guard: a run whose loss or trained weights explode (``--learn-rate 1e9``
grows embedding vectors from 0.5 to 4.5e9 while every loss stays finite) stops before it writes anything, so
the last good file and resume state stay as they were.

Both limits are far outside what a healthy run does: a diffusion loss (an MSE against unit-variance noise)
stays around 0.01 to 2, and trained weights drift a few times from where they started, not a thousandfold.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Sequence

import torch

LOSS_FACTOR = 1000.0
"""A loss this many times the median of the recent ones (and above LOSS_FLOOR) is a spike."""
LOSS_FLOOR = 100.0
WEIGHT_FACTOR = 1000.0
"""Trained weights whose RMS grew this many times (from at least WEIGHT_FLOOR) have exploded."""
WEIGHT_FLOOR = 0.01
WINDOW = 50
MIN_HISTORY = 5


def weights_rms(params: Sequence[torch.Tensor]) -> float:
    """Root mean square over every element of `params` (inf/nan when any element is). Tensors a host has
    parked on the meta device (the stand-in's ``--medvram`` swaps) hold no values and are left out."""
    params = [p for p in params if not p.is_meta]
    count = sum(p.numel() for p in params)
    if not count:
        return 0.0
    with torch.no_grad():
        total = sum(float(p.detach().float().pow(2).sum()) for p in params)
    return math.sqrt(total / count) if math.isfinite(total) else float("inf")


class SpikeGuard:
    """Call :meth:`problem` after each optimizer step; a non-None answer says why the run must stop."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.start_rms = weights_rms(self.params)
        self.recent: deque[float] = deque(maxlen=WINDOW)

    def problem(self, loss: float) -> str | None:
        rms = weights_rms(self.params)
        limit = WEIGHT_FACTOR * max(self.start_rms, WEIGHT_FLOOR)
        if not math.isfinite(rms) or rms > limit:
            return (f"the trained weights exploded (root mean square {self.start_rms:.3g} at the start, "
                    f"{rms:.3g} now)")
        if len(self.recent) >= MIN_HISTORY:
            median = statistics.median(self.recent)
            if loss > max(LOSS_FACTOR * median, LOSS_FLOOR):
                return f"the loss jumped to {loss:.3g} (median of the last {len(self.recent)} steps: {median:.3g})"
        self.recent.append(loss)
        return None
