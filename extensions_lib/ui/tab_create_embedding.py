"""The "Create embedding" sub-tab, as the WebUI's (name, initialization text, vectors, overwrite)."""
from __future__ import annotations

import gradio as gr

from ..embeddings.options import CreateEmbeddingOptions
from ..errors import AlchemyError
from .context import UIContext
from .forms import render_options
from .progress import JobRunner
from .training_jobs import CreateEmbeddingRequest, create_embedding_file
from .widgets import error_text, outcome, progress_panel, run_and_report, unsupported_note, watch_js

PANEL = "create_embedding"


def build_create_embedding(runner: JobRunner, context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab. Creating reads the model's token
    vectors, so it runs as a job (never while training uses the model)."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    with gr.Row(elem_id="alchemy_create_embedding"):
        with gr.Column(scale=3):
            form = render_options(CreateEmbeddingOptions, context.defaults_for(CreateEmbeddingOptions),
                                  elem_prefix="alchemy_create_embedding")
            create = gr.Button("Create embedding", variant="primary", elem_id="alchemy_create_embedding_start")
        with gr.Column(scale=2):
            progress_panel(PANEL)
            result = gr.Textbox(label="Result", lines=3, interactive=False, elem_id="alchemy_create_embedding_result")

    def on_create(*values):
        try:
            request = CreateEmbeddingRequest(form.read(values), context)
        except AlchemyError as exc:
            return error_text(exc)
        p = run_and_report(runner, create_embedding_file, request, title=f"Creating embedding {request.options.name}",
                           panel=PANEL)
        return f"Created: {p.result}" if p.state == "done" else outcome(p)

    create.click(fn=on_create, inputs=form.inputs, outputs=[result], _js=watch_js(PANEL))
