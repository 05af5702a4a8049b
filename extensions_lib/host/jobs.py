"""Long jobs inside the WebUI: one at a time, through the host's GPU queue, reported in ``shared.state``.

:class:`HostJobRunner` is the :class:`~extensions_lib.jobs.progress.JobRunner` the tabs and the HTTP API use
inside the WebUI. A job runs on its own thread, wrapped by the host's ``call_queue.wrap_gradio_gpu_call``:
it waits its turn behind any generation in the host's FIFO queue (shown as "queued" by the host's progress
endpoint under our task id), the host calls ``shared.state.begin``/``end`` around it, and meanwhile:

- progress goes to our :class:`~extensions_lib.jobs.progress.ProgressBoard` (what ``alchemy.js`` polls: step,
  loss curve, it/s, ETA, previews) *and* to ``shared.state`` (``job_no``/``job_count``, ``textinfo``, the
  preview as the current image), so the host's own progress bar and Interrupt button work too;
- the job stops at its next safe point (trainers save first) when our Interrupt is pressed, when the host's
  Interrupt sets ``shared.state.interrupted``, or when the model it started with is no longer the current
  one (another checkpoint selected or reloaded: see :class:`~extensions_lib.host.webui_adapter.ModelWatch`);
- a second job while one is queued or running is refused with :class:`Busy` saying which job runs.
- a job that takes the model first has the extension set aside what acts on it at generation time (the
  hypernetwork toggle), as the WebUI's own training does.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import AlchemyError, Cancelled
from ..jobs.progress import JobContext, ProgressBoard
from ..jobs.thread_runner import BackgroundJobRunner, describe_error, ended_early

log = logging.getLogger(__name__)


class Busy(AlchemyError):
    """Another Alchemy job is queued or running (HTTP 409)."""


class _StateBoard(ProgressBoard):
    """A progress board that also mirrors into the host's ``shared.state`` while our job owns it."""

    def __init__(self):
        super().__init__()
        self.host_state = None

    def update(self, **fields) -> None:
        super().update(**fields)
        state = self.host_state
        if state is None:
            return
        p = self.snapshot()
        if "step" in fields or "total" in fields:
            state.job_count = int(p.total) if p.total else -1
            state.job_no = int(p.step)
        parts = [f"{p.title}: {p.step}/{p.total or '?'} {p.unit}s"]
        if p.loss is not None:
            parts.append(f"loss {p.loss:.7f}")
        if p.message:
            parts.append(p.message)
        state.textinfo = "<br/>".join(parts)


class _Stop:
    """The job's cancel flag: our Interrupt, the host's Interrupt, or the model changing under the job."""

    def __init__(self, runner: "HostJobRunner"):
        self.runner = runner
        self.event = threading.Event()
        self.reason = ""
        self.model_token = None

    def model_used(self, token) -> None:
        """The job took the model (``ModelWatch.adapter``): from now on it must stay the same one."""
        if self.model_token is None:
            self.model_token = token

    def is_set(self) -> bool:
        if self.event.is_set():
            return True
        state = self.runner.board.host_state
        if state is not None and getattr(state, "interrupted", False):
            self.reason = self.reason or "interrupted from the WebUI"
            self.event.set()
            return True
        watch = self.runner.watch
        if watch is not None and self.model_token is not None:
            change = watch.changed(self.model_token)
            if change:
                self.reason = f"stopped because {change} while the job ran"
                self.event.set()
                return True
        return False


class HostJobRunner(BackgroundJobRunner):
    """Runs ``job_fn(options, job)`` under the host's GPU queue; one job at a time (see the module docstring).

    state: the host's ``shared.state`` (or None). gpu_call: the host's ``call_queue.wrap_gradio_gpu_call``
    (or None: then the job runs without queueing, e.g. on hosts without it). watch: a ``ModelWatch``; jobs
    stop when the model they started with changes. on_model_use: called once per job, inside the queue, when
    the job first takes the model (the extension takes its generation-time patches off it then).
    """

    def __init__(self, state: Any = None, gpu_call: Callable | None = None, watch: Any = None,
                 on_model_use: Callable[[], None] | None = None):
        self.state = state
        self.gpu_call = gpu_call
        self.watch = watch
        self.on_model_use = on_model_use
        super().__init__(_StateBoard())
        self._stop = _Stop(self)
        self.last_error: BaseException | None = None
        """The exception the last job failed with (None if it did not fail)."""

    # --- the JobRunner protocol ----------------------------------------------------------------------
    def start(self, job_fn: Callable[[Any, JobContext], Any], options: Any, *, title: str, panel: str = "") -> str:
        with self._lock:
            current = self.board.snapshot()
            if current.active or current.state == "queued":
                where = "waiting in the WebUI's queue" if current.state == "queued" else \
                    f"at {current.step}/{current.total or '?'}"
                raise Busy(f"another Alchemy job is running: {current.title} ({where})",
                           fix="wait for it to finish or press Interrupt, then start again")
            job_id = f"alchemy-{next(self._ids)}"
            self._stop = _Stop(self)
            self.board.begin(job_id, title, panel)
            self.board.update(state="queued", message="waiting for the WebUI's queue (a generation may be running)")
            self._spawn(job_id, job_id, self._run, job_id, job_fn, options)
        return job_id

    def interrupt(self) -> bool:
        """Ask the current job to stop; a queued one is dropped before it starts. False when none."""
        p = self.board.snapshot()
        if p.state == "queued":
            self._stop.reason = "interrupted before it started"
            self._stop.event.set()
            return True
        if not self.board.stopping():
            return False
        self._stop.reason = self._stop.reason or "interrupted"
        self._stop.event.set()
        return True

    # --- running -------------------------------------------------------------------------------------
    def _run(self, job_id: str, job_fn, options) -> None:
        outcome: dict[str, Any] = {}

        def in_queue(id_task: str):
            # The host has called state.begin(job=id_task): the state is ours until we return.
            self._execute(job_fn, options, outcome)
            return ["", ""]  # the host's wrapper appends its timing HTML to the last item

        in_queue.__name__ = f"alchemy_{job_id.replace('-', '_')}"
        try:
            call = self.gpu_call(in_queue, extra_outputs=[""]) if self.gpu_call is not None else in_queue
            call(f"task({job_id})")
        except BaseException as exc:  # noqa: BLE001 — the thread must always record how the job ended
            outcome.setdefault("error", exc)
        finally:
            self._finish(outcome)

    def _execute(self, job_fn, options, outcome: dict) -> None:
        stop = self._stop
        if stop.event.is_set():
            outcome["cancelled"] = True
            return
        self.board.update(state="running", message="starting")
        if self.state is not None:
            self.board.host_state = self.state
            self.state.job = "alchemy"
            self.state.job_count = -1
        if self.watch is not None:  # only a job that takes the model stops when the model changes
            self.watch.listener = self._model_listener(stop)
        job = JobContext(self.board, stop, on_preview=self._show_preview)
        try:
            result = outcome["result"] = job_fn(options, job)
            outcome["cancelled"] = ended_early(result, stop.event.is_set())
        except Cancelled:
            outcome["cancelled"] = True
        except BaseException as exc:  # noqa: BLE001 — reported on the board, not as the host's error HTML
            if not isinstance(exc, AlchemyError):
                log.exception("Alchemy job %s failed", self.board.snapshot().title)
            outcome["error"] = exc
        finally:
            self.board.host_state = None
            if self.watch is not None:
                self.watch.listener = None

    def _model_listener(self, stop: _Stop) -> Callable[[tuple[int, int]], None]:
        def took(token) -> None:
            first = stop.model_token is None
            stop.model_used(token)
            if first and self.on_model_use is not None:
                self.on_model_use()
        return took

    def _finish(self, outcome: dict) -> None:
        self.last_error = outcome.get("error")
        if "error" in outcome:
            self.board.finish("failed", error=describe_error(outcome["error"]))
        elif outcome.get("cancelled"):
            reason = self._stop.reason or "stopped before it finished"
            message = self.board.snapshot().message
            self.board.finish("cancelled", message=f"{reason}. {message}" if message else reason,
                              result=outcome.get("result"))
        else:
            self.board.finish("done", result=outcome.get("result"))

    def _show_preview(self, path: Path) -> None:
        state = self.state
        if state is None or not hasattr(state, "assign_current_image"):
            return
        try:
            from PIL import Image

            with Image.open(path) as image:
                state.assign_current_image(image.copy())
        except OSError:
            pass  # a preview that cannot be read is not worth failing the job over
