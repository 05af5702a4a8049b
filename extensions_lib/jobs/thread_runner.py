"""The standalone :class:`~extensions_lib.jobs.progress.JobRunner`: one job at a time on a background thread.

Used by ``alchemy ui`` (and by tests). Inside the WebUI the glue provides a runner over the host's GPU
queue instead (:class:`~extensions_lib.host.jobs.HostJobRunner`), with the same interface; what both do
alike is :class:`BackgroundJobRunner`, here because the host runner may import the jobs package but not the
other way round.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable

from ..errors import AlchemyError, Cancelled
from .progress import JobContext, JobProgress, ProgressBoard

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """What the user reads when a job fails: an AlchemyError verbatim, anything else with its type."""
    if isinstance(exc, AlchemyError):
        return exc.message
    return f"unexpected error: {type(exc).__name__}: {exc} (details in the console log)"


def ended_early(result: Any, stop_requested: bool) -> bool:
    """Whether a job that returned `result` stopped short of its work. A result that says so is believed
    (``TrainResult.cancelled``, the tagger's ``RunSummary.interrupted``): an Interrupt that arrives while a
    run writes its final file comes too late to cut it short, and the run did finish. Other results: whether
    a stop was asked for."""
    said = getattr(result, "cancelled", getattr(result, "interrupted", None))
    return bool(said) if said is not None else stop_requested


class BackgroundJobRunner:
    """What both runners share: a progress board, one job at a time, each on its own daemon thread.
    Subclasses start a job (under ``_lock``) with :meth:`_spawn`."""

    def __init__(self, board: ProgressBoard):
        self.board = board
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._done: dict[str, threading.Event] = {}

    def _spawn(self, job_id: str, thread_name: str, run: Callable[..., None], *args: Any) -> None:
        """Call `run(*args)` on a new daemon thread; :meth:`wait` for `job_id` returns once it has returned."""
        done = threading.Event()
        self._done = {job_id: done}  # only the latest job is waited for: an older id returns at once

        def target() -> None:
            try:
                run(*args)
            finally:
                done.set()

        self._thread = threading.Thread(target=target, name=thread_name, daemon=True)
        self._thread.start()

    def wait(self, job_id: str, timeout: float | None = None) -> JobProgress:
        done = self._done.get(job_id)
        if done is not None:
            done.wait(timeout)
        return self.board.snapshot()

    def progress(self) -> JobProgress:
        return self.board.snapshot()


class ThreadJobRunner(BackgroundJobRunner):
    """Runs ``job_fn(options, job)`` on a daemon thread; refuses a second job while one runs."""

    def __init__(self):
        super().__init__(ProgressBoard())
        self._cancel = threading.Event()

    def start(self, job_fn: Callable[[Any, JobContext], Any], options: Any, *, title: str, panel: str = "") -> str:
        with self._lock:
            current = self.board.snapshot()
            if current.active:
                raise AlchemyError(f"another job is running: {current.title} ({current.step}/{current.total or '?'})",
                                   fix="wait for it to finish or press Interrupt, then start again")
            job_id = f"job-{next(self._ids)}"
            self._cancel = threading.Event()
            self.board.begin(job_id, title, panel)
            self._spawn(job_id, f"alchemy-{job_id}", self._run, job_fn, options, JobContext(self.board, self._cancel))
        return job_id

    def _run(self, job_fn, options, job: JobContext) -> None:
        try:
            result = job_fn(options, job)
        except Cancelled:
            self.board.finish("cancelled", message="stopped before it finished")
        except BaseException as exc:  # noqa: BLE001 — the thread must always record how the job ended
            if not isinstance(exc, AlchemyError):
                log.exception("job %s failed", job.board.snapshot().title)
            self.board.finish("failed", error=describe_error(exc))
        else:
            self.board.finish("cancelled" if ended_early(result, job.should_stop()) else "done", result=result)

    def interrupt(self) -> bool:
        if not self.board.stopping():
            return False
        self._cancel.set()
        return True
