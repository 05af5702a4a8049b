"""The resume state: everything needed to continue a run exactly, in ``<log>/resume-state.pt``.

Written with ``torch.save`` (atomically) and read back with torch's restricted weights-only unpickler:
only tensors and plain containers/values are stored, never code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import AlchemyError
from ..safe_pickle import real_data_bytes
from ..options import from_dict, to_dict

STATE_FILE = "resume-state.pt"
STATE_FORMAT = "alchemy-train-state"
STATE_VERSION = 1
# Options that may differ on resume without making the run a different one.
RESUME_FREE = {"steps", "resume", "save_every", "create_image_every", "write_csv_every", "log_directory",
               "save_optimizer_state", "save_resume_state", "save_training_settings", "source_note",
               "max_nonfinite_steps"}


@dataclass
class RunCounters:
    """Mutable counters of one run (everything else is derived or lives in torch objects)."""

    step: int = 0
    drawn: int = 0
    """Optimizer-step batches taken from the data (a skipped non-finite step consumes one too)."""
    streak: int = 0
    """Non-finite steps in a row."""
    skipped: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    last_prompt: str = ""


def find_resume_state(resume: str | Path) -> Path:
    """The resume-state file of a run: `resume` may be the file itself or the run's log folder."""
    path = Path(resume)
    candidate = path / STATE_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise AlchemyError("no resume state found", path,
                           fix=f"give the log folder of a run (it holds {STATE_FILE}) or the file itself")
    return candidate


def load_resume_state(path: str | Path) -> dict:
    """Read a resume state with torch's restricted (weights-only) unpickler."""
    path = find_resume_state(path)
    try:
        real_data_bytes(path)  # torch's weights-only loader would inflate a zip bomb before refusing anything
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AlchemyError(f"resume state cannot be read: {_why_refused(exc)}", path,
                           fix="resume from an earlier run folder or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise AlchemyError("not an Alchemy resume state", path, fix=f"give the {STATE_FILE} of a run")
    if state.get("version", 0) > STATE_VERSION:
        raise AlchemyError(f"resume state version {state.get('version')} is newer than this Alchemy understands",
                           path, fix="update Alchemy")
    return state


def _why_refused(exc: Exception) -> str:
    """torch's reason, without its advice to turn weights_only off: that would let the file run code."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line or "unsupported global" in line.lower():
            return ("refused, it asks for something other than tensors and numbers, which a resume state never holds "
                    f"({line.split('error:', 1)[-1].strip()}); it may have been tampered with")
    plain = [line for line in lines if "weights_only" not in line.lower() and "trusted source" not in line]
    return (plain[0] if plain else type(exc).__name__)[:300]


def resume_options(resume: str | Path, options_cls, overrides: dict | None = None):
    """The options a run was started with (seed included), so the caller can rebuild the same method
    before calling :func:`train`; `overrides` replaces e.g. ``steps`` to train further."""
    state = load_resume_state(resume)
    values = dict(state["settings"])
    values.update(overrides or {})
    values["resume"] = str(find_resume_state(resume))
    return from_dict(options_cls, values, source=str(resume))


def save_state(path: Path, method, options, optimizer, scaler, rngs, run: RunCounters) -> None:
    data = method.data
    state = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "name": method.name,
        "step": run.step, "drawn": run.drawn, "streak": run.streak, "skipped": run.skipped,
        "settings": to_dict(options), "dataset_hash": data.content_hash, "dataset_images": data.image_count,
        "method": method.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs.state(),
        "loss_steps": torch.tensor([s for s, _ in run.losses], dtype=torch.int64),
        "loss_values": torch.tensor([v for _, v in run.losses], dtype=torch.float64),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def restore(state: dict, path: Path, method, options, optimizer, scaler, rngs, run: RunCounters) -> list[str]:
    """Load `state` into the method, optimizer, scaler, RNGs and counters; warnings for changed options."""
    if state["name"] != method.name:
        raise AlchemyError(f"resume state belongs to run {state['name']!r}, not {method.name!r}", path,
                           fix="resume with the same name, or give the log folder of this run")
    if state["dataset_hash"] != method.data.content_hash:
        raise AlchemyError("the dataset changed since this run was saved (different images or captions)",
                           options.data_root or path,
                           fix="restore the dataset folder as it was, or start a new run")
    saved, now = state["settings"], to_dict(options)
    changed = sorted(k for k in saved.keys() & now.keys() if k not in RESUME_FREE and saved[k] != now[k])
    warnings = [f"option {k} changed from {saved[k]!r} to {now[k]!r}: the run will not repeat an uninterrupted "
                "one exactly" for k in changed]
    method.load_state_dict(state["method"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise AlchemyError(f"the optimizer state does not fit the trained parameters ({exc})", path,
                           fix="resume with the same method options, or start a new run") from None
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rngs.restore(state["rng"])
    run.step, run.drawn, run.streak, run.skipped = state["step"], state["drawn"], state["streak"], state["skipped"]
    run.losses = list(zip(state["loss_steps"].tolist(), state["loss_values"].tolist()))
    return warnings
