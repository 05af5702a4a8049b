"""The layout both "Create ..." sub-tabs share: the create options, a button, and the result.

What creating does comes in as ``create(options) -> message``. Creating an embedding reads the model, so
it runs as a job and its tab also shows the live progress panel; creating a hypernetwork is instant.
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from ..errors import AlchemyError
from ..jobs.context import UIContext
from .forms import render_options
from .widgets import error_text, progress_panel, unsupported_note, watch_js


def build_create_tab(context: UIContext, *, panel: str, noun: str, options_cls: type,
                     create: Callable[[Any], str], progress: bool = False) -> None:
    """Render a create sub-tab into the current gradio Blocks/Tab; the result box shows what `create`
    returns, or the error. progress: add the progress panel (for a `create` that runs as a job)."""
    if panel in context.unsupported:
        unsupported_note(context.unsupported[panel])
        return
    prefix = f"alchemy_{panel}"
    with gr.Row(elem_id=prefix):
        with gr.Column(scale=3):
            form = render_options(options_cls, context.defaults_for(options_cls), elem_prefix=prefix)
            button = gr.Button(f"Create {noun}", variant="primary", elem_id=f"{prefix}_start")
        with gr.Column(scale=2):
            if progress:
                progress_panel(panel)
            result = gr.Textbox(label="Result", lines=3, interactive=False, elem_id=f"{prefix}_result")

    def on_create(*values):
        try:
            return create(form.read(values))
        except AlchemyError as exc:
            return error_text(exc)

    button.click(fn=on_create, inputs=form.inputs, outputs=[result], _js=watch_js(panel) if progress else None)
