"""The layout both training sub-tabs share (the WebUI's Train tab, one method each).

Left: what to train (a dropdown of existing files, with refresh), the prompt template (shipped templates
and the host's, or a path), then every other option of the method's options class under its headings.
Right: the live progress panel (bar, loss curve, latest preview), the outcome, and the files in the output
folder; inside the WebUI ``javascript/alchemy.js`` moves this pane into the Train tab's own right-hand column
(``#ti_gallery_container``) while the sub-tab is open, where the built-in trainer shows its output. The method-specific
parts come in a :class:`TrainTabSpec`. Inside the WebUI (``context.preview_params`` set) the preview
settings are read from its txt2img tab, as the built-in Train tab does, instead of being shown here.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..errors import AlchemyError
from ..library_cache import LibraryCache
from ..options import specs
from ..jobs.context import UIContext
from .forms import render_options
from ..jobs.progress import JobRunner
from ..jobs.training import PREVIEW_FIELDS, TrainRequest, with_txt2img_preview
from .widgets import (SIDE_PANE_CLASS, error_text, interrupt_button, outcome, progress_panel, refresh_button,
                      run_and_report, unsupported_note, watch_js)

TEMPLATE_OPTION = "template_file"


Row = tuple[str, str, str]
"""(name, details, path) of one file in a folder listing."""


class FolderListing:
    """A method's folder as its train tab lists it (the library made on the first look and refreshed on
    each later one: :class:`~extensions_lib.library_cache.LibraryCache`)."""

    def __init__(self, make_library: Callable[[Path], Any], folder: Path, rows: Callable[[Any], list[Row]], *,
                 elem_id: str, empty: str):
        self.folder, self.rows = folder, rows
        self.elem_id, self.empty = elem_id, empty
        self._cache = LibraryCache(make_library)

    def library(self):
        return self._cache.get(self.folder)

    def names(self) -> list[str]:
        return self.library().names()

    def html(self) -> str:
        return files_table(self.rows(self.library()), self.elem_id, self.empty)


@dataclass
class TrainTabSpec:
    panel: str
    """Tab key and element-id stem ("train_embedding")."""
    noun: str
    """What is trained, for labels ("embedding")."""
    options_cls: type
    name_option: str
    """The option of `options_cls` naming the file to train; rendered as a dropdown of the listing's names."""
    job: Callable[[Any, Any], Any]
    """``job(TrainRequest, JobContext) -> result``."""
    listing: FolderListing
    """The folder the trained files are picked from and written to."""
    make_request: Callable[[Any, UIContext], Any] = TrainRequest

    @classmethod
    def of(cls, method, listing: FolderListing) -> "TrainTabSpec":
        """The tab of a registered method (:class:`~extensions_lib.methods.registry.MethodSpec`)."""
        from ..methods.registry import resolve

        return cls(panel=method.train_panel, noun=method.noun, options_cls=method.train_options,
                   name_option=method.name_option, job=resolve(method.train_job), listing=listing)


def option_spec(cls, name: str):
    for spec in specs(cls):
        if spec.name == name:
            return spec
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def files_table(rows: list[Row], elem_id: str, empty: str) -> str:
    """An HTML table of (name, details, path); details starting with "skipped" are greyed out."""
    if not rows:
        return f'<div class="alchemy-note" id="{elem_id}">{html.escape(empty)}</div>'
    body = "".join(
        f'<tr class="{"alchemy-skipped" if details.startswith("skipped") else ""}" data-name="{html.escape(name)}">'
        f"<td>{html.escape(name)}</td><td>{html.escape(details)}</td><td>{html.escape(path)}</td></tr>"
        for name, details, path in rows)
    return (f'<table class="alchemy-files" id="{elem_id}"><thead><tr><th>Name</th><th>Details</th><th>File</th></tr>'
            f"</thead><tbody>{body}</tbody></table>")


def build_train_tab(runner: JobRunner, context: UIContext, spec: TrainTabSpec) -> None:
    """Render one training sub-tab from `spec` into the current gradio Blocks/Tab."""
    if spec.panel in context.unsupported:
        unsupported_note(context.unsupported[spec.panel])
        return
    prefix = f"alchemy_{spec.panel}"
    tab = gr.context.Context.block  # the gr.Tab this is built into (if it is one)
    defaults = context.defaults_for(spec.options_cls)
    name_spec = option_spec(spec.options_cls, spec.name_option)
    template_spec = option_spec(spec.options_cls, TEMPLATE_OPTION)
    names = spec.listing.names()
    with gr.Row(elem_id=prefix):
        with gr.Column(scale=3):
            with gr.Row():
                current = getattr(defaults, spec.name_option) or (names[0] if names else None)
                name = gr.Dropdown(choices=names, value=current, allow_custom_value=True, label=name_spec.label,
                                   info=name_spec.help, elem_id=f"{prefix}_{spec.name_option}")
                refresh = refresh_button(f"{prefix}_refresh")
            # A method whose prompts come from elsewhere (DreamBooth's instance/class prompts) hides the option.
            templates = [gr.Dropdown(choices=context.template_choices(), value=getattr(defaults, TEMPLATE_OPTION),
                                     allow_custom_value=True, label=template_spec.label, info=template_spec.help,
                                     elem_id=f"{prefix}_{TEMPLATE_OPTION}")] if template_spec.ui else []
            from_txt2img = list(context.preview_params or [])
            form = render_options(spec.options_cls, defaults, elem_prefix=prefix,
                                  skip=(spec.name_option, TEMPLATE_OPTION, *(PREVIEW_FIELDS if from_txt2img else ())),
                                  open_groups=("", "Dataset", "Run"))
            with gr.Row():
                start = gr.Button(f"Train {spec.noun.capitalize()}", variant="primary", elem_id=f"{prefix}_start")
                interrupt_button(runner, spec.panel)
        with gr.Column(scale=2, elem_classes=[SIDE_PANE_CLASS]):
            progress_panel(spec.panel)
            result = gr.Textbox(label="Result", lines=4, interactive=False, elem_id=f"{prefix}_result")
            files = gr.HTML(spec.listing.html(), elem_id=f"{prefix}_files")

    n_options = len(form.inputs)

    def on_train(name_value, *values):
        extra = {spec.name_option: name_value or ""}
        if templates:
            extra[TEMPLATE_OPTION], values = values[0] or "", values[1:]
        try:
            options = form.read(values[:n_options], extra=extra)
            options, note = with_txt2img_preview(options, values[n_options:])
            request = spec.make_request(options, context)
        except AlchemyError as exc:
            return error_text(exc), spec.listing.html(), gr.update()
        p = run_and_report(runner, spec.job, request,
                           title=f"Training {spec.noun} {getattr(options, spec.name_option)}", panel=spec.panel)
        text = outcome(p) + (f"\n{note}" if note else "")
        return text, spec.listing.html(), gr.update(choices=spec.listing.names())

    def on_refresh():
        return gr.update(choices=spec.listing.names()), spec.listing.html()

    start.click(fn=on_train, inputs=[name, *templates, *form.inputs, *from_txt2img], outputs=[result, files, name],
                _js=watch_js(spec.panel))
    refresh.click(fn=on_refresh, inputs=[], outputs=[name, files])
    # Files made since the page was built (the Create tab, the API, the CLI, the host) are listed when the
    # sub-tab is opened and when the list gets focus: no refresh click needed.
    if isinstance(tab, gr.Tab):
        tab.select(fn=on_refresh, inputs=[], outputs=[name, files], queue=False)
    name.focus(fn=on_refresh, inputs=[], outputs=[name, files], queue=False)

