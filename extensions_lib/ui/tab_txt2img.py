"""The standalone app's txt2img panel, for trying embeddings (by name in the prompt) and hypernetworks
(``<hypernet:name:mult>`` tags, or the select + strength toggle). Inside the WebUI its own txt2img tab does
this, so the glue does not use this builder."""
from __future__ import annotations

import html

import gradio as gr

from ..errors import AlchemyError
from ..sampling.txt2img import GenerationOptions
from ..jobs.context import UIContext
from .forms import render_options
from ..jobs.generate import NO_HYPERNETWORK, GenerateRequest, Loaders, generate_images
from ..jobs.progress import JobRunner
from .widgets import (error_text, interrupt_button, outcome, progress_panel, refresh_button, run_and_report,
                      unsupported_note, watch_js)

PANEL = "txt2img"


def hypernetwork_choices(loaders: Loaders) -> list[str]:
    return [NO_HYPERNETWORK, *loaders.hypernetworks().names()]


def embeddings_note(loaders: Loaders) -> str:
    """Which embedding names a prompt can use (and which files are skipped, with why)."""
    library = loaders.embeddings()
    names = library.names()
    text = ("Embeddings you can use in the prompt: " + ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
            if names else f"No embeddings in {html.escape(str(loaders.context.embeddings_dir))} yet.")
    skipped = "".join(f"<li>{html.escape(e.describe())}</li>" for e in library.skipped)
    return f'<div class="alchemy-note" id="alchemy_txt2img_embeddings_list">{text}' + \
        (f"<ul>{skipped}</ul>" if skipped else "") + "</div>"


def build_txt2img(runner: JobRunner, context: UIContext, loaders: Loaders | None = None) -> None:
    """Render the txt2img panel into the current gradio Blocks/Tab."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    loaders = loaders or Loaders(context)
    with gr.Row(elem_id="alchemy_txt2img"):
        with gr.Column(scale=3):
            form = render_options(GenerationOptions, context.defaults_for(GenerationOptions),
                                  elem_prefix="alchemy_txt2img")
            with gr.Row():
                hypernetwork = gr.Dropdown(choices=hypernetwork_choices(loaders), value=NO_HYPERNETWORK,
                                           label="Hypernetwork", elem_id="alchemy_txt2img_hypernetwork")
                strength = gr.Slider(minimum=0.0, maximum=1.0, step=0.001, value=1.0, label="Hypernetwork strength",
                                     elem_id="alchemy_txt2img_hypernetwork_strength")
                refresh = refresh_button("alchemy_txt2img_refresh")
            embeddings = gr.HTML(embeddings_note(loaders))
            with gr.Row():
                start = gr.Button("Generate", variant="primary", elem_id="alchemy_txt2img_start")
                interrupt_button(runner, PANEL)
        with gr.Column(scale=2):
            progress_panel(PANEL)
            gallery = gr.Gallery(label="Images", elem_id="alchemy_txt2img_gallery", columns=2, height="auto")
            info = gr.Textbox(label="Generation info", lines=4, interactive=False, elem_id="alchemy_txt2img_info")

    def on_generate(hn_name, hn_strength, *values):
        try:
            options = form.read(values)
        except AlchemyError as exc:
            return [], error_text(exc)
        request = GenerateRequest(options, loaders, hn_name or NO_HYPERNETWORK, float(hn_strength))
        p = run_and_report(runner, generate_images, request, title="Generating", panel=PANEL)
        if p.state != "done":
            return [], outcome(p)
        images = p.result
        return images, "\n\n".join(image.info.get("parameters", "") for image in images)

    def on_refresh(current):
        choices = hypernetwork_choices(loaders)
        return (gr.update(choices=choices, value=current if current in choices else NO_HYPERNETWORK),
                embeddings_note(loaders))

    start.click(fn=on_generate, inputs=[hypernetwork, strength, *form.inputs], outputs=[gallery, info],
                _js=watch_js(PANEL))
    refresh.click(fn=on_refresh, inputs=[hypernetwork], outputs=[hypernetwork, embeddings])
