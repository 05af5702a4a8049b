"""Small gradio pieces every tab uses: the progress panel, job buttons and how results are shown.

Progress is drawn in the browser by ``javascript/alchemy.js`` (bar, step, loss, it/s, ETA, loss curve,
preview), which polls ``alchemy/progress``; a start button's ``_js`` hook tells it which panel to
watch. The click handler itself waits for the job and returns its final status, so the tab is right
even without the script.
"""
from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from ..errors import AlchemyError
from ..jobs.progress import JobProgress, JobRunner, run_job, status_line

REFRESH_SYMBOL = "\u21bb"  # ↻: an arrow every font has (the WebUI's 🔄 needs an emoji font)


def watch_js(panel: str) -> str:
    """``_js`` for a start button: begin polling progress for `panel`, pass the inputs on unchanged."""
    return f"(...args) => {{ if (window.alchemyWatch) alchemyWatch({panel!r}); return args; }}"


def progress_panel(panel: str) -> gr.HTML:
    """The element ``alchemy.js`` draws `panel`'s job progress into."""
    return gr.HTML(f'<div class="alchemy-progress" data-panel="{html.escape(panel)}" data-state="idle"></div>',
                   elem_id=f"alchemy_{panel}_progress", elem_classes=["alchemy-progress-host"])


def refresh_button(elem_id: str) -> gr.Button:
    return gr.Button(REFRESH_SYMBOL, elem_id=elem_id, elem_classes=["alchemy-refresh"], size="sm", scale=0,
                     min_width=40)


def interrupt_button(runner: JobRunner, panel: str) -> gr.Button:
    """An Interrupt button: asks the running job to stop at its next safe point (it saves first)."""
    def stop() -> None:
        runner.interrupt()

    button = gr.Button("Interrupt", elem_id=f"alchemy_{panel}_interrupt", variant="stop")
    # Unqueued: the queue's workers may all be waiting on jobs, and this must get through at once.
    button.click(fn=stop, inputs=[], outputs=[], queue=False)
    return button


def unsupported_note(reason: str) -> gr.HTML:
    return gr.HTML(f'<div class="alchemy-unsupported">Not available here: {html.escape(reason)}</div>')


def error_text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, AlchemyError) else f"{type(exc).__name__}: {exc}"


def run_and_report(runner: JobRunner, job_fn: Callable, request: Any, *, title: str, panel: str) -> JobProgress:
    """Start `job_fn(request)` on `runner` and wait for it; a refused start (another job running, bad
    input found before starting) comes back as a failed progress with the reason."""
    try:
        return run_job(runner, job_fn, request, title=title, panel=panel)
    except AlchemyError as exc:
        return JobProgress(title=title, panel=panel, state="failed", error=exc.message)


def outcome(p: JobProgress) -> str:
    """The status text a tab shows once its job has ended."""
    text = status_line(p)
    if p.state in ("done", "cancelled") and p.message and p.message not in text:
        text += "\n" + p.message
    return text
