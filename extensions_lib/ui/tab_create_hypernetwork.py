"""The "Create hypernetwork" sub-tab, as the WebUI's (same options, defaults and checks)."""
from __future__ import annotations

import gradio as gr

from ..errors import AlchemyError
from ..hypernetworks.create import create_hypernetwork
from ..hypernetworks.options import CreateHypernetworkOptions
from .context import UIContext
from .forms import render_options
from .widgets import error_text, unsupported_note

PANEL = "create_hypernetwork"


def create_file(options: CreateHypernetworkOptions, context: UIContext) -> str:
    """Write the new hypernetwork into the hypernetworks folder; the message the tab shows."""
    path = create_hypernetwork(options, context.hypernetworks_dir)
    context.files_changed("hypernetworks")
    return f"Created: {path}"


def build_create_hypernetwork(context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab (no job runner: creating is instant
    and does not touch the model)."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    with gr.Row(elem_id="alchemy_create_hypernetwork"):
        with gr.Column(scale=3):
            form = render_options(CreateHypernetworkOptions, context.defaults_for(CreateHypernetworkOptions),
                                  elem_prefix="alchemy_create_hypernetwork")
            create = gr.Button("Create hypernetwork", variant="primary", elem_id="alchemy_create_hypernetwork_start")
        with gr.Column(scale=2):
            result = gr.Textbox(label="Result", lines=3, interactive=False,
                                elem_id="alchemy_create_hypernetwork_result")

    def on_create(*values):
        try:
            return create_file(form.read(values), context)
        except AlchemyError as exc:
            return error_text(exc)

    create.click(fn=on_create, inputs=form.inputs, outputs=[result])
