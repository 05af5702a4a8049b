"""The tagger tab: caption a folder (or try one image) with a WD14 or DeepDanbooru model."""
from __future__ import annotations

import gradio as gr

from ..errors import AlchemyError
from ..tagger.options import CaptionOptions, TagRunOptions
from ..jobs.context import UIContext
from ..jobs.dataset import TagImageRequest, TagRequest, tag_folder, tag_image
from .forms import render_options
from ..jobs.progress import JobRunner
from .widgets import (error_text, interrupt_button, outcome, progress_panel, refresh_button, run_and_report,
                      unsupported_note, watch_js)

PANEL = "tagger"


def tagger_choices(context: UIContext) -> list[str]:
    """Model folders found in the tagger models folder (names, as ``alchemy tag --model`` takes them)."""
    from ..tagger.models import list_models

    return list(list_models(context.tagger_models_dir))


def build_tagger(runner: JobRunner, context: UIContext) -> None:
    """Render the tagger tab's contents into the current gradio Blocks/Tab."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    choices = tagger_choices(context)
    with gr.Row(elem_id="alchemy_tagger"):
        with gr.Column(scale=3):
            with gr.Row():
                model = gr.Dropdown(choices=choices, value=choices[0] if choices else None, allow_custom_value=True,
                                    label="Tagger model", elem_id="alchemy_tagger_model",
                                    info=f"a folder in {context.tagger_models_dir} (WD14: model.onnx + "
                                         "selected_tags.csv; DeepDanbooru: its .pt), or a path")
                refresh = refresh_button("alchemy_tagger_model_refresh")
            folder = gr.Textbox(label="Image folder", elem_id="alchemy_tagger_folder",
                                placeholder="folder holding the images; captions are written beside them")
            with gr.Row():
                start = gr.Button("Tag folder", variant="primary", elem_id="alchemy_tagger_start")
                interrupt_button(runner, PANEL)
            with gr.Accordion("Try one image", open=False):
                image = gr.Image(type="pil", label="Image", elem_id="alchemy_tagger_image")
                tag_one = gr.Button("Tag image", elem_id="alchemy_tagger_image_start")
            caption_form = render_options(CaptionOptions, context.defaults_for(CaptionOptions),
                                          elem_prefix="alchemy_tagger_caption", open_groups=("Thresholds",))
            with gr.Accordion("Run options", open=False):
                run_form = render_options(TagRunOptions, context.defaults_for(TagRunOptions),
                                          elem_prefix="alchemy_tagger_run")
        with gr.Column(scale=2):
            progress_panel(PANEL)
            result = gr.Textbox(label="Result", lines=10, interactive=False, elem_id="alchemy_tagger_result")

    n_caption = len(caption_form.inputs)

    def read(values):
        return caption_form.read(values[:n_caption]), run_form.read(values[n_caption:])

    def on_tag_folder(model_name, folder_path, *values):
        try:
            caption, run = read(values)
        except AlchemyError as exc:
            return error_text(exc)
        request = TagRequest(folder_path, model_name, run, caption, context)
        return outcome(run_and_report(runner, tag_folder, request, title=f"Tagging {folder_path}", panel=PANEL))

    def on_tag_image(model_name, picture, *values):
        try:
            caption, run = read(values)
        except AlchemyError as exc:
            return error_text(exc)
        p = run_and_report(runner, tag_image, TagImageRequest(picture, model_name, run, caption, context),
                           title="Tagging one image", panel=PANEL)
        return p.result if p.state == "done" else outcome(p)

    options = caption_form.inputs + run_form.inputs
    start.click(fn=on_tag_folder, inputs=[model, folder, *options], outputs=[result], _js=watch_js(PANEL))
    tag_one.click(fn=on_tag_image, inputs=[model, image, *options], outputs=[result], _js=watch_js(PANEL))
    refresh.click(fn=lambda: gr.update(choices=tagger_choices(context)), inputs=[], outputs=[model])
