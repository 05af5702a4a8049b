"""The Captions tab: BLIP sentences, CLIP-interrogator terms and tagger tags, composed into one caption
per image (or tried on one image)."""
from __future__ import annotations

import dataclasses

import gradio as gr

from ..captioners.options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions
from ..errors import AlchemyError
from ..tagger.options import CaptionOptions
from ..jobs.captions import CaptionRequest, caption_folder, caption_image, captioner_models_dir
from ..jobs.context import UIContext
from .forms import render_options
from ..jobs.progress import JobRunner
from .tab_tagger import tagger_choices
from .widgets import (error_text, interrupt_button, outcome, progress_panel, refresh_button, run_and_report,
                      unsupported_note, watch_js)

PANEL = "captions"


def blip_choices(context: UIContext) -> list[str]:
    from ..captioners.models import KNOWN_BLIP, is_blip_folder

    root = captioner_models_dir(context)
    found = sorted(p.name for p in root.iterdir() if is_blip_folder(p)) if root.is_dir() else []
    return [""] + found + [k for k in KNOWN_BLIP if k not in found]


def build_captions(runner: JobRunner, context: UIContext) -> None:
    """Render the Captions tab's contents into the current gradio Blocks/Tab."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    with gr.Row(elem_id="alchemy_captions"):
        with gr.Column(scale=3):
            with gr.Row():
                blip = gr.Dropdown(choices=blip_choices(context), value="", allow_custom_value=True,
                                   label="BLIP model", elem_id="alchemy_captions_blip",
                                   info=f"a folder in {captioner_models_dir(context)}, a path, or blip-base / "
                                        "blip-large (tick Download once); empty: no sentence")
                clip = gr.Textbox(label="CLIP interrogator model", elem_id="alchemy_captions_clip",
                                  placeholder="sd1 (ViT-L/14) / sd2 (ViT-H/14) / ARCH/TAG; empty: no CLIP terms")
                tagger = gr.Dropdown(choices=[""] + tagger_choices(context), value="", allow_custom_value=True,
                                     label="Tagger model", elem_id="alchemy_captions_tagger",
                                     info="booru tags for the tags part; empty: none")
                refresh = refresh_button("alchemy_captions_refresh")
            clip_path = gr.Textbox(label="CLIP weights (optional)", elem_id="alchemy_captions_clip_path",
                                   placeholder="a .pt/.bin/.safetensors file or an open_clip folder")
            folder = gr.Textbox(label="Image folder", elem_id="alchemy_captions_folder",
                                placeholder="folder holding the images; captions are written beside them")
            with gr.Row():
                start = gr.Button("Caption folder", variant="primary", elem_id="alchemy_captions_start")
                interrupt_button(runner, PANEL)
            with gr.Accordion("Try one image", open=False):
                image = gr.Image(type="pil", label="Image", elem_id="alchemy_captions_image")
                one = gr.Button("Caption image", elem_id="alchemy_captions_image_start")
            forms = [render_options(cls, context.defaults_for(cls), elem_prefix=f"alchemy_captions_{key}",
                                    open_groups=("Caption",))
                     for key, cls in (("compose", ComposeOptions), ("blip", BlipOptions), ("clip", InterrogateOptions))]
            with gr.Accordion("Run options", open=False):
                forms.append(render_options(CaptionRunOptions, context.defaults_for(CaptionRunOptions),
                                            elem_prefix="alchemy_captions_run"))
        with gr.Column(scale=2):
            progress_panel(PANEL)
            result = gr.Textbox(label="Result", lines=10, interactive=False, elem_id="alchemy_captions_result")

    sizes = [len(f.inputs) for f in forms]

    def read(blip_model, clip_model, clip_file, tagger_model, values):
        out, at = [], 0
        for form, n in zip(forms, sizes):
            out.append(form.read(values[at:at + n]))
            at += n
        compose, blip_opts, clip_opts, run = out
        run = dataclasses.replace(run, blip_model=str(blip_model or "").strip(), clip_model=str(clip_model or "").strip(),
                                  clip_path=str(clip_file).strip() or None if clip_file else None,
                                  tagger_model=str(tagger_model or "").strip())
        return dict(run=run, compose=compose, blip=blip_opts, clip=clip_opts,
                    tags=context.defaults_for(CaptionOptions), context=context)

    def on_folder(blip_model, clip_model, clip_file, tagger_model, folder_path, *values):
        try:
            opts = read(blip_model, clip_model, clip_file, tagger_model, values)
        except AlchemyError as exc:
            return error_text(exc)
        return outcome(run_and_report(runner, caption_folder, CaptionRequest(folder=folder_path, **opts),
                                      title=f"Captioning {folder_path}", panel=PANEL))

    def on_image(blip_model, clip_model, clip_file, tagger_model, picture, *values):
        try:
            opts = read(blip_model, clip_model, clip_file, tagger_model, values)
        except AlchemyError as exc:
            return error_text(exc)
        p = run_and_report(runner, caption_image, CaptionRequest(image=picture, **opts),
                           title="Captioning one image", panel=PANEL)
        return p.result if p.state == "done" else outcome(p)

    options = [c for f in forms for c in f.inputs]
    models = [blip, clip, clip_path, tagger]
    start.click(fn=on_folder, inputs=[*models, folder, *options], outputs=[result], _js=watch_js(PANEL))
    one.click(fn=on_image, inputs=[*models, image, *options], outputs=[result], _js=watch_js(PANEL))
    refresh.click(fn=lambda: (gr.update(choices=blip_choices(context)),
                              gr.update(choices=[""] + tagger_choices(context))), inputs=[], outputs=[blip, tagger])
