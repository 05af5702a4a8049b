"""The "Create ..." sub-tab of a registered training method: the create options, a button, and the result.

What creating does is the method's ``create_job`` (:mod:`extensions_lib.methods.registry`). Creating an
embedding reads the model, so (``create_needs_model``) it runs as a job on the runner (never while training
uses the model) and the tab also shows the live progress panel; creating a hypernetwork is instant and runs
in the click handler.
"""
from __future__ import annotations

import gradio as gr

from ..errors import AlchemyError
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from ..jobs.training import CreateRequest
from ..methods.registry import MethodSpec, resolve
from .forms import render_options
from .widgets import error_text, outcome, progress_panel, run_and_report, unsupported_note, watch_js


def build_create_tab(runner: JobRunner, context: UIContext, method: MethodSpec) -> None:
    """Render `method`'s create sub-tab into the current gradio Blocks/Tab; the result box shows the
    written file, or the error."""
    panel, options_cls = method.create_panel, method.create_options
    if panel in context.unsupported:
        unsupported_note(context.unsupported[panel])
        return
    job = resolve(method.create_job)
    prefix = f"alchemy_{panel}"
    with gr.Row(elem_id=prefix):
        with gr.Column(scale=3):
            form = render_options(options_cls, context.defaults_for(options_cls), elem_prefix=prefix)
            button = gr.Button(f"Create {method.noun}", variant="primary", elem_id=f"{prefix}_start")
        with gr.Column(scale=2):
            if method.create_needs_model:
                progress_panel(panel)
            result = gr.Textbox(label="Result", lines=3, interactive=False, elem_id=f"{prefix}_result")

    def create(options) -> str:
        request = CreateRequest(options, context)
        if not method.create_needs_model:
            return f"Created: {job(request, None)}"
        p = run_and_report(runner, job, request, title=f"Creating {method.noun} {getattr(options, 'name', '')}", panel=panel)
        return f"Created: {p.result}" if p.state == "done" else outcome(p)

    def on_create(*values):
        try:
            return create(form.read(values))
        except AlchemyError as exc:
            return error_text(exc)

    button.click(fn=on_create, inputs=form.inputs, outputs=[result],
                 _js=watch_js(panel) if method.create_needs_model else None)
