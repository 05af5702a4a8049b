"""Every random number generator a training run draws from, captured and restored together.

The loop owns a ``random.Random`` (prompts: template line, tag dropout and shuffle) and a CPU
``torch.Generator`` (noise, timesteps, "random" latents); methods may also use the global RNGs (dropout
layers). All of them go into the resume state, so a resumed run draws the same numbers.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


class LoopRngs:
    """The loop's own generators plus the global ones, captured and restored together."""

    def __init__(self, seed: int):
        self.python = random.Random(seed)
        self.torch = torch.Generator().manual_seed(seed)

    @staticmethod
    def seed_globals(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # seeds CUDA too

    def state(self) -> dict:
        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        loop_version, loop_internal, loop_gauss = self.python.getstate()
        return {
            "loop_python": {"version": loop_version, "state": torch.tensor(loop_internal, dtype=torch.int64),
                            "gauss": loop_gauss},
            "loop_torch": self.torch.get_state(),
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def restore(self, s: dict) -> None:
        p = s["loop_python"]
        self.python.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
        self.torch.set_state(s["loop_torch"])
        p = s["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
        n = s["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(s["torch"])
        if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def global_rng_preserved():
    """Previews draw from the global RNGs; put them back so training continues as if none happened."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
