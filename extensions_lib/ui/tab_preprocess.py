"""The preprocessing tab: the WebUI's old "Preprocess images" (size, split, focal crop, flip, captions)."""
from __future__ import annotations

import gradio as gr

from ..errors import AlchemyError
from ..preprocess.options import PreprocessOptions
from ..tagger.options import CaptionOptions
from ..jobs.context import UIContext
from ..jobs.dataset import PreprocessRequest, preprocess_folder
from .forms import render_options
from ..jobs.progress import JobRunner
from .widgets import error_text, interrupt_button, outcome, progress_panel, run_and_report, unsupported_note, watch_js

PANEL = "preprocess"
# Preprocessing has its own existing-caption policy (PreprocessOptions.existing_caption), so the tagger's is
# not offered, as `alchemy preprocess` leaves it out too.
TAGGER_POLICY = ("existing_caption",)


def build_preprocess(runner: JobRunner, context: UIContext) -> None:
    """Render the preprocessing tab's contents into the current gradio Blocks/Tab."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    with gr.Row(elem_id="alchemy_preprocess"):
        with gr.Column(scale=3):
            source = gr.Textbox(label="Source directory", elem_id="alchemy_preprocess_source",
                                placeholder="folder of source images (never modified)")
            destination = gr.Textbox(label="Destination directory", elem_id="alchemy_preprocess_destination",
                                     placeholder="output folder (created; a re-run resumes where it stopped)")
            with gr.Row():
                start = gr.Button("Preprocess", variant="primary", elem_id="alchemy_preprocess_start")
                interrupt_button(runner, PANEL)
            form = render_options(PreprocessOptions, context.defaults_for(PreprocessOptions),
                                  elem_prefix="alchemy_preprocess", open_groups=("Size", "Modes", "Captions"))
            with gr.Accordion("Tagger captions (with a tagger model)", open=False):
                caption_form = render_options(CaptionOptions, context.defaults_for(CaptionOptions),
                                              elem_prefix="alchemy_preprocess_caption", skip=TAGGER_POLICY,
                                              accordions=False)
        with gr.Column(scale=2):
            progress_panel(PANEL)
            result = gr.Textbox(label="Result", lines=10, interactive=False, elem_id="alchemy_preprocess_result")

    n_options = len(form.inputs)

    def on_start(src, dst, *values):
        try:
            options = form.read(values[:n_options])
            caption = caption_form.read(values[n_options:])
        except AlchemyError as exc:
            return error_text(exc)
        request = PreprocessRequest(src, dst, options, caption, context)
        return outcome(run_and_report(runner, preprocess_folder, request, title=f"Preprocessing {src}", panel=PANEL))

    start.click(fn=on_start, inputs=[source, destination, *form.inputs, *caption_form.inputs], outputs=[result],
                _js=watch_js(PANEL))
