"""The dataset checks tab: face counts, watermark scores or text removal over a folder, as a job with progress
(the same jobs as the HTTP API and the same options as `alchemy faces|watermark|detext`)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..detext.options import DetextOptions
from ..errors import AlchemyError
from ..faces.options import FaceModelOptions, FaceScanOptions
from ..watermark.options import WatermarkOptions
from ..jobs.checks import DetextRequest, FacesRequest, WatermarkRequest, detext_folder, faces_folder, watermark_folder
from ..jobs.context import UIContext
from .forms import render_options
from ..jobs.progress import JobRunner
from .widgets import error_text, interrupt_button, outcome, progress_panel, run_and_report, unsupported_note, watch_js

PANEL = "checks"
CHECKS = ("faces", "watermarks", "text removal")


def build_checks(runner: JobRunner, context: UIContext) -> None:
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    with gr.Row(elem_id="alchemy_checks"):
        with gr.Column(scale=3):
            folder = gr.Textbox(label="Image folder", elem_id="alchemy_checks_folder",
                                placeholder="folder of images (never modified, except by a move you ask for)")
            check = gr.Radio(list(CHECKS), value=CHECKS[0], label="Check", elem_id="alchemy_checks_check")
            model = gr.Textbox(label="Model file", elem_id="alchemy_checks_model",
                               info="empty: the default place (YuNet: models/opencv; watermark: models/watermark/"
                                    "watermark_model_v1.pt; text: the rapidocr wheel or models/ocr)")
            move_to = gr.Textbox(label="Move flagged images to / write text-free copies to",
                                 elem_id="alchemy_checks_target",
                                 info="faces/watermarks with action 'move'; text removal's output folder")
            with gr.Row():
                start = gr.Button("Run check", variant="primary", elem_id="alchemy_checks_start")
                interrupt_button(runner, PANEL)
            with gr.Accordion("Faces", open=True):
                face_model = render_options(FaceModelOptions, context.defaults_for(FaceModelOptions),
                                            elem_prefix="alchemy_checks_faces")
                face_scan = render_options(FaceScanOptions, context.defaults_for(FaceScanOptions),
                                           elem_prefix="alchemy_checks_faces_scan")
            with gr.Accordion("Watermarks", open=False):
                watermark = render_options(WatermarkOptions, context.defaults_for(WatermarkOptions),
                                           elem_prefix="alchemy_checks_watermark")
            with gr.Accordion("Text removal", open=False):
                detext = render_options(DetextOptions, context.defaults_for(DetextOptions),
                                        elem_prefix="alchemy_checks_detext")
        with gr.Column(scale=2):
            progress_panel(PANEL)
            result = gr.Textbox(label="Result", lines=10, interactive=False, elem_id="alchemy_checks_result")
    forms = [face_model, face_scan, watermark, detext]

    def on_start(folder_text, check_name, model_text, target_text, *values):
        values = list(values)
        parsed = []
        try:
            for form in forms:
                n = len(form.inputs)
                parsed.append((form, values[:n]))
                del values[:n]
            source = Path(str(folder_text or "").strip()).expanduser()
            if not str(folder_text or "").strip() or not source.is_dir():
                raise AlchemyError("image folder not found", source if str(folder_text or "").strip() else None,
                                   "type the path of a folder of images")
            target = str(target_text or "").strip() or None
            model_path = str(model_text or "").strip()
            if check_name == "faces":
                m = face_model.read(parsed[0][1], extra={"model": model_path})
                scan = face_scan.read(parsed[1][1], extra={"move_to": target})
                job, request = faces_folder, FacesRequest(source, m, scan)
            elif check_name == "watermarks":
                options = watermark.read(parsed[2][1], extra={"model": model_path, "move_to": target})
                job, request = watermark_folder, WatermarkRequest(source, options)
            else:
                if target is None:
                    raise AlchemyError("no output folder for the text-free copies", fix="fill in the second box")
                options = detext.read(parsed[3][1], extra={"model": model_path})
                job, request = detext_folder, DetextRequest(source, Path(target).expanduser(), options, context)
        except AlchemyError as exc:
            return error_text(exc)
        return outcome(run_and_report(runner, job, request, title=f"{check_name.capitalize()} in {source.name}",
                                      panel=PANEL))

    inputs = [folder, check, model, move_to, *[c for form in forms for c in form.inputs]]
    start.click(fn=on_start, inputs=inputs, outputs=[result], _js=watch_js(PANEL))
