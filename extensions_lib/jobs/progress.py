"""Progress of the one long job a UI runs at a time: what the tabs, the JavaScript and the API read.

A job is a function ``job_fn(options, job: JobContext) -> result``. It reports through its
:class:`JobContext` (``update``, ``set_preview``, ``train_callback`` for the trainer core's
``Progress``, ``counter`` for ``(done, total)`` callbacks) and stops when ``job.cancel.is_set()``.
A :class:`JobRunner` runs it: :class:`~extensions_lib.jobs.thread_runner.ThreadJobRunner` on its own,
the WebUI glue's runner over the host's GPU queue and ``shared.state`` inside the WebUI. Both keep
the numbers in a :class:`ProgressBoard`, so the JSON the browser polls (:func:`progress_payload`) is the
same everywhere.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

RUNNING_STATES = ("queued", "running", "stopping")
FINAL_STATES = ("done", "cancelled", "failed")
MAX_CURVE_POINTS = 400
"""Loss-curve points sent to the browser; longer runs are averaged into this many buckets."""


@dataclass
class JobProgress:
    """A snapshot of the current (or last) job. ``total`` 0 means "not known yet"."""

    job_id: str = ""
    title: str = ""
    panel: str = ""
    """Which tab started the job (its progress element is ``#alchemy_<panel>_progress``)."""
    state: str = "idle"
    """idle, queued (waiting for the host's GPU queue), running, stopping (interrupt asked), done, cancelled
    or failed."""
    step: int = 0
    total: int = 0
    unit: str = "step"
    loss: float | None = None
    it_per_s: float = 0.0
    eta_s: float | None = None
    message: str = ""
    error: str = ""
    preview: Path | None = None
    preview_version: int = 0
    """Goes up each time a new preview arrives, so pollers fetch the image only when it changed."""
    loss_points: list[tuple[int, float]] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    result: Any = None
    """What ``job_fn`` returned (not sent to the browser)."""

    @property
    def active(self) -> bool:
        return self.state in RUNNING_STATES


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class JobRunner(Protocol):
    """What the tab builders call. One job at a time; a second ``start`` while one runs is refused with an
    :class:`~extensions_lib.errors.AlchemyError` that says which job is running."""

    def start(self, job_fn: Callable[[Any, "JobContext"], Any], options: Any, *, title: str,
              panel: str = "") -> str:
        """Start `job_fn(options, job)`; returns the job id."""
        ...

    def wait(self, job_id: str, timeout: float | None = None) -> JobProgress:
        """Block until job `job_id` has ended (or `timeout` passed); its final progress."""
        ...

    def progress(self) -> JobProgress:
        """A snapshot of the current or last job."""
        ...

    def interrupt(self) -> bool:
        """Ask the running job to stop at its next safe point (it saves what it has); False if none runs."""
        ...


def run_job(runner: JobRunner, job_fn: Callable[[Any, "JobContext"], Any], options: Any, *, title: str,
            panel: str = "") -> JobProgress:
    """Start a job and wait for its end (what a click handler does while the browser polls progress)."""
    return runner.wait(runner.start(job_fn, options, title=title, panel=panel))


# ---- pure helpers ------------------------------------------------------------------------------------

def downsample(points: Sequence[tuple[int, float]], limit: int = MAX_CURVE_POINTS) -> list[tuple[int, float]]:
    """At most `limit` points: consecutive runs averaged (step of each bucket's last point), so the curve
    keeps its shape and ends at the last step."""
    if len(points) <= limit:
        return [(int(s), float(v)) for s, v in points]
    out = []
    n = len(points)
    for b in range(limit):
        lo, hi = b * n // limit, (b + 1) * n // limit
        bucket = points[lo:hi]
        out.append((int(bucket[-1][0]), sum(v for _, v in bucket) / len(bucket)))
    return out


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; unknown -> ``"?"``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_payload(p: JobProgress, max_points: int = MAX_CURVE_POINTS) -> dict:
    """The JSON the browser polls: every field it shows, the loss curve downsampled."""
    return {
        "job_id": p.job_id, "title": p.title, "panel": p.panel, "state": p.state, "active": p.active,
        "step": p.step, "total": p.total, "unit": p.unit,
        "fraction": min(1.0, p.step / p.total) if p.total else None,
        "loss": p.loss, "it_per_s": round(p.it_per_s, 4), "eta_s": p.eta_s, "eta": format_duration(p.eta_s),
        "elapsed": format_duration((p.finished_at or time.time()) - p.started_at) if p.started_at else "",
        "message": p.message, "error": p.error,
        "preview_version": p.preview_version if p.preview is not None else 0,
        "loss_points": downsample(p.loss_points, max_points),
    }


def status_line(p: JobProgress) -> str:
    """One line for a text box: what the job did or is doing."""
    if p.state == "idle":
        return "No job has run yet."
    count = f"{p.step}/{p.total} {p.unit}s" if p.total else f"{p.step} {p.unit}s"
    head = {"queued": "Queued", "running": "Running", "stopping": "Stopping", "done": "Finished",
            "cancelled": "Stopped", "failed": "Failed"}.get(p.state, p.state.capitalize())
    text = f"{head}: {p.title} ({count}"
    if p.loss is not None:
        text += f", loss {p.loss:.4f}"
    text += ")"
    if p.state == "failed" and p.error:
        return f"{text}: {p.error}"
    return f"{text}: {p.message}" if p.message else text


# ---- the shared store --------------------------------------------------------------------------------

class ProgressBoard:
    """Thread-safe holder of the current job's :class:`JobProgress` (one per runner)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._p = JobProgress()

    def snapshot(self) -> JobProgress:
        with self._lock:
            return dataclasses.replace(self._p, loss_points=list(self._p.loss_points))

    def begin(self, job_id: str, title: str, panel: str) -> None:
        with self._lock:
            self._p = JobProgress(job_id=job_id, title=title, panel=panel, state="running", started_at=time.time(),
                                  message="starting")

    def update(self, **fields) -> None:
        unknown = set(fields) - {f.name for f in dataclasses.fields(JobProgress)}
        if unknown:
            raise TypeError(f"unknown progress fields: {sorted(unknown)}")
        with self._lock:
            for name, value in fields.items():
                setattr(self._p, name, value)

    def add_loss(self, step: int, loss: float) -> None:
        with self._lock:
            points = self._p.loss_points
            if points and points[-1][0] >= step:  # a resumed or repeated step replaces the old tail
                while points and points[-1][0] >= step:
                    points.pop()
            points.append((int(step), float(loss)))

    def set_preview(self, path: Path) -> None:
        with self._lock:
            self._p.preview = Path(path)
            self._p.preview_version += 1

    def stopping(self) -> bool:
        """Mark the running job as asked to stop; False when none runs (a job already stopping still runs)."""
        with self._lock:
            if self._p.state == "stopping":
                return True
            if self._p.state not in ("queued", "running"):
                return False
            self._p.state = "stopping"
            return True

    def finish(self, state: str, *, message: str = "", error: str = "", result: Any = None) -> None:
        with self._lock:
            self._p.state = state
            self._p.finished_at = time.time()
            self._p.eta_s = None
            if message:
                self._p.message = message
            self._p.error = error
            self._p.result = result


# ---- what a job sees ---------------------------------------------------------------------------------

class JobContext:
    """Handed to ``job_fn``: report progress here, stop when ``cancel.is_set()``.

    cancel: the runner's stop flag (a ``threading.Event``, or the host's interrupt state).
    on_preview: called with each preview's path besides recording it (the WebUI runner shows it as the
    host's current image).
    """

    def __init__(self, board: ProgressBoard, cancel: CancelFlag,
                 on_preview: Callable[[Path], None] | None = None):
        self.board = board
        self.cancel = cancel
        self._on_preview = on_preview
        self._speed: list[tuple[float, int]] = []

    def should_stop(self) -> bool:
        return bool(self.cancel.is_set())

    def update(self, **fields) -> None:
        """Set progress fields (step, total, unit, loss, message, ...). When `step` moves and no speed is
        given, it/s and ETA are estimated from the last few updates."""
        if "step" in fields and "it_per_s" not in fields:
            now = time.perf_counter()
            self._speed = (self._speed + [(now, int(fields["step"]))])[-20:]
            (t0, s0), (t1, s1) = self._speed[0], self._speed[-1]
            if t1 > t0 and s1 > s0:
                rate = (s1 - s0) / (t1 - t0)
                fields["it_per_s"] = rate
                total = fields.get("total") or self.board.snapshot().total
                if total:
                    fields.setdefault("eta_s", max(0, total - int(fields["step"])) / rate)
        self.board.update(**fields)

    def set_preview(self, path: str | Path) -> None:
        self.board.set_preview(Path(path))
        if self._on_preview is not None:
            self._on_preview(Path(path))

    def counter(self, unit: str = "image") -> Callable[..., None]:
        """A ``progress(done, total, *extra)`` callback (the tagger's and the preprocessor's)."""
        def progress(done: int, total: int, *extra) -> None:
            self.update(step=int(done), total=int(total), unit=unit,
                        message=f"{getattr(extra[0], 'name', '')}" if extra else "")
        return progress

    def train_callback(self, p) -> None:
        """Record a trainer-core ``extensions_lib.train.loop.Progress``."""
        fields = dict(step=p.step, total=p.max_steps, unit="step", it_per_s=p.it_per_s, eta_s=p.eta_s)
        if p.loss is not None:
            fields["loss"] = p.loss
            self.board.add_loss(p.step, p.loss)
        notes = [p.message] if p.message else []
        if p.saved is not None:
            notes.append(f"saved {p.saved}")
        if notes:
            fields["message"] = "; ".join(notes)
        elif p.last_prompt:
            fields["message"] = f"prompt: {p.last_prompt}"
        self.board.update(**fields)
        if p.preview is not None:
            self.set_preview(p.preview)
