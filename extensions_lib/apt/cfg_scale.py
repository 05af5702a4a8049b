"""The CFG-scale field of APT training: a constant (``"3"``) or a schedule over timesteps (``"1.5-3"``,
``"1.5-3:cos"``).

A schedule gives s(t) = lo + (hi − lo)·f(r) with r = t / (T − 1), so noisier timesteps get the scale
nearer `hi`. f is chosen by name from a fixed list — ``ln`` (linear, the default), ``cos``
(sin(rπ/2)), ``cos2`` (1 − cos(rπ/2)), ``sqrt`` — never evaluated as code (DreamArtist passed the text
after the colon to ``eval``). Scales must lie in [1, 30] and not all be 1: at s = 1 the guided prediction
is the positive one alone and the negative embedding would learn nothing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import AlchemyError

MAX_SCALE = 30.0
CURVES = {
    "ln": lambda r: r,
    "cos": lambda r: torch.sin(r * (math.pi / 2)),
    "cos2": lambda r: 1 - torch.cos(r * (math.pi / 2)),
    "sqrt": torch.sqrt,
}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SCHEDULE = re.compile(rf"^{_NUMBER}\s*-\s*{_NUMBER}\s*(?::\s*(\w+))?$")
_FIX = ("write a number like '3' or a range 'low-high' with an optional curve, e.g. '1.5-3' or '1.5-3:cos' "
        f"(curves: {', '.join(CURVES)})")


@dataclass(frozen=True)
class CfgScale:
    low: float
    high: float
    curve: str = "ln"
    text: str = ""

    @property
    def constant(self) -> bool:
        return self.low == self.high

    def at(self, timesteps: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
        """s(t) per timestep, float32 on the timesteps' device."""
        if self.constant:
            return torch.full(timesteps.shape, self.low, dtype=torch.float32, device=timesteps.device)
        r = timesteps.to(torch.float32) / (num_timesteps - 1)
        return self.low + (self.high - self.low) * CURVES[self.curve](r)

    def mean(self, num_timesteps: int = 1000) -> float:
        """The average scale over all timesteps: what previews sample with (sampling guides at one scale)."""
        return float(self.at(torch.arange(num_timesteps), num_timesteps).mean())


def parse_cfg_scale(text: str, option: str = "cfg_scale") -> CfgScale:
    """Parse the field; AlchemyError naming the option and what is wrong otherwise."""
    raw = str(text).strip()
    match = _SCHEDULE.match(raw)
    try:
        if match:
            low, high, curve = float(match.group(1)), float(match.group(2)), (match.group(3) or "ln")
        else:
            low = high = float(raw)
            curve = "ln"
    except ValueError:
        raise AlchemyError(f"option {option}: {raw!r} is not a scale or a schedule", fix=_FIX) from None
    if curve not in CURVES:
        raise AlchemyError(f"option {option}: unknown curve {curve!r} in {raw!r}", fix=_FIX)
    for value in (low, high):
        if not math.isfinite(value) or not 1.0 <= value <= MAX_SCALE:
            raise AlchemyError(f"option {option}: scale {value:g} in {raw!r} is outside 1 to {MAX_SCALE:g}", fix=_FIX)
    if max(low, high) == 1.0:
        raise AlchemyError(f"option {option}: a CFG scale of 1 makes the guided prediction the positive one alone, so "
                           "the negative embedding would learn nothing",
                           fix="use a scale above 1 (3 is usual), or train a single embedding with textual inversion")
    return CfgScale(low, high, curve, raw)
