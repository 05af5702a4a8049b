"""The tag editor tab: a dataset's images with their captions, a tag table, filters, batch edits with a
preview, per-image edits, undo/redo. All editing goes through :class:`extensions_lib.tag_editor.TagEditor`
(the same core as ``alchemy tags``): each applied edit is saved at once, atomically, after a snapshot."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import gradio as gr

from ..errors import AlchemyError
from ..tag_editor import Edit, TagEditor
from ..tag_editor.options import TagDatasetOptions, TagEditOptions, TagListOptions, TagSelectOptions
from ..tag_editor.thumbs import default_thumb_dir, thumbnail
from ..jobs.context import UIContext
from .forms import render_options
from .widgets import error_text, unsupported_note

PANEL = "tag_editor"
GALLERY_LIMIT = 300   # thumbnails per gallery page
PREVIEW_LIMIT = 500
ACTIONS = ("add", "remove", "replace")
TABLE_HEADERS = ["tag", "images", "tokens"]
CHANGE_HEADERS = ["image", "before", "after"]


def _table(rows: list, headers: list[str]) -> dict:
    # gradio 3.41 forgets a Dataframe's headers when handed a bare empty list
    return {"data": rows, "headers": headers}
TARGETS = ("filtered images", "selected image")


@dataclass
class _Inputs:
    editor: TagEditor | None
    folder: str
    dataset: TagDatasetOptions
    select: TagSelectOptions
    listing: TagListOptions
    action: str
    tags: str
    find: str
    replacement: str
    edit: TagEditOptions
    target: str
    selected: str
    caption: str
    page: int = 1


class TagEditorView:
    """The tab's handlers without gradio widgets (tests call these directly)."""

    def __init__(self, context: UIContext, forms: dict[str, Any] | None = None):
        self.context = context
        self.forms = forms or {}
        self.thumb_dir = (context.cache_dir / "thumbnails") if context.cache_dir else default_thumb_dir()
        self._token_count = None

    def token_count(self, tag: str) -> int:
        if self._token_count is None:
            from ..tag_editor.stats import clip_token_counter

            self._token_count = clip_token_counter()
        return self._token_count(tag)

    # -- building blocks ---------------------------------------------------------------------------
    def keys(self, inp: _Inputs) -> list[str]:
        if inp.editor is None:
            raise AlchemyError("no dataset loaded", fix="enter a folder and press Load")
        if inp.target == "selected image":
            if not inp.selected:
                raise AlchemyError("no image selected", fix="click an image in the gallery first")
            return [inp.editor.entry(inp.selected).key]
        return inp.editor.select(inp.select.tag_filter())

    def make_edit(self, inp: _Inputs) -> Edit:
        if inp.action == "replace":
            return Edit("replace", find=inp.find, replacement=inp.replacement, regex=inp.edit.regex,
                        scope=inp.edit.scope)
        return Edit(inp.action, tags=(inp.tags,), position=inp.edit.position)

    def view(self, inp: _Inputs, status: str = "") -> tuple:
        """(gallery items, shown keys, tag table rows, status) for the current filter."""
        if inp.editor is None:
            return [], [], _table([], TABLE_HEADERS), status
        keys = inp.editor.select(inp.select.tag_filter())
        pages = max(1, -(-len(keys) // GALLERY_LIMIT))
        page = min(max(1, inp.page), pages)
        items, shown = [], []
        for key in keys[(page - 1) * GALLERY_LIMIT:page * GALLERY_LIMIT]:
            thumb = thumbnail(inp.editor.entries[key].image, self.thumb_dir)
            if thumb is not None:
                items.append((str(thumb), inp.editor.entries[key].text or "(no caption)"))
                shown.append(key)
        rows = inp.listing.rows(inp.editor.counts(keys), self.token_count)
        table = _table([[tag, count, self.token_count(tag)] for tag, count in rows], TABLE_HEADERS)
        line = f"{len(keys)} of {len(inp.editor.entries)} images match"
        if pages > 1:
            line += f" (gallery page {page} of {pages}, {GALLERY_LIMIT} per page)"
        if inp.editor.skipped:
            line += f"; {len(inp.editor.skipped)} caption file(s) unreadable, left alone"
        return items, shown, table, "\n".join(x for x in (status, line) if x)

    # -- events ------------------------------------------------------------------------------------
    def load(self, inp: _Inputs):
        folder = inp.folder.strip()
        if not folder:
            raise AlchemyError("no folder given", fix="enter the dataset folder")
        inp.editor = TagEditor(folder, recursive=inp.dataset.recursive, extension=inp.dataset.caption_extension,
                               separator=inp.edit.separator)
        return inp.editor, *self.view(inp, f"loaded {inp.editor.folder}"), _table([], CHANGE_HEADERS), "", ""

    def preview(self, inp: _Inputs):
        keys, edit = self.keys(inp), self.make_edit(inp)
        changes = inp.editor.preview(edit, keys)
        rows = [[c.key, c.before, c.after] for c in changes[:PREVIEW_LIMIT]]
        return _table(rows, CHANGE_HEADERS), f"{len(changes)} caption(s) would change (nothing written yet)"

    def apply(self, inp: _Inputs):
        keys, edit = self.keys(inp), self.make_edit(inp)  # keys first: it says when nothing is loaded
        result = inp.editor.apply(edit, keys, allow_empty=inp.edit.allow_empty)
        return self._after(inp, _result_text(result))

    def save_caption(self, inp: _Inputs):
        if inp.editor is None or not inp.selected:
            raise AlchemyError("no image selected", fix="click an image in the gallery first")
        result = inp.editor.set_caption(inp.selected, inp.caption, allow_empty=inp.edit.allow_empty)
        return self._after(inp, _result_text(result))

    def undo(self, inp: _Inputs, redo: bool = False):
        if inp.editor is None:
            raise AlchemyError("no dataset loaded", fix="enter a folder and press Load")
        result = inp.editor.redo() if redo else inp.editor.undo()
        return self._after(inp, _result_text(result) if result else f"nothing to {'redo' if redo else 'undo'}")

    def _after(self, inp: _Inputs, status: str):
        caption = inp.editor.entries[inp.selected].text if inp.selected in inp.editor.entries else ""
        return (*self.view(inp, status), _table([], CHANGE_HEADERS), caption)

    def select_image(self, shown: Sequence[str], editor: TagEditor | None, index: int):
        if editor is None or not 0 <= index < len(shown) or shown[index] not in editor.entries:
            return "", ""
        key = shown[index]
        return key, editor.entries[key].text


def _result_text(result) -> str:
    lines = [result.summary()] + [f"skipped {k}: {why}" for k, why in result.skipped[:20]]
    if len(result.skipped) > 20:
        lines.append(f"... and {len(result.skipped) - 20} more")
    return "\n".join(lines)


def build_tag_editor(context: UIContext) -> None:
    """Render the tag editor's contents into the current gradio Blocks/Tab."""
    if PANEL in context.unsupported:
        unsupported_note(context.unsupported[PANEL])
        return
    editor_state = gr.State(None)
    shown_state = gr.State([])
    with gr.Row(elem_id="alchemy_tags"):
        with gr.Column(scale=3):
            with gr.Row():
                folder = gr.Textbox(label="Dataset folder", elem_id="alchemy_tags_folder", scale=4,
                                    placeholder="folder of images with .txt captions beside them")
                load = gr.Button("Load", variant="primary", elem_id="alchemy_tags_load", scale=1)
            dataset_form = render_options(TagDatasetOptions, context.defaults_for(TagDatasetOptions),
                                          elem_prefix="alchemy_tags_dataset")
            gallery = gr.Gallery(label="Images (click one to edit its caption)", elem_id="alchemy_tags_gallery",
                                 columns=6, height=480, allow_preview=False)
            page = gr.Number(value=1, precision=0, label="Gallery page", elem_id="alchemy_tags_page",
                             info=f"{GALLERY_LIMIT} images per page; press Filter to show another page")
            with gr.Row():
                selected = gr.Textbox(label="Selected image", interactive=False, elem_id="alchemy_tags_selected",
                                      scale=1)
                caption = gr.Textbox(label="Its caption", lines=2, elem_id="alchemy_tags_caption", scale=3)
            save_caption = gr.Button("Save this caption", elem_id="alchemy_tags_save_caption")
        with gr.Column(scale=2):
            select_form = render_options(TagSelectOptions, context.defaults_for(TagSelectOptions),
                                         elem_prefix="alchemy_tags_select")
            apply_filter = gr.Button("Filter", elem_id="alchemy_tags_filter")
            with gr.Accordion("Tag table", open=True):
                list_form = render_options(TagListOptions, context.defaults_for(TagListOptions),
                                           elem_prefix="alchemy_tags_list")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "number", "number"],
                                     interactive=False, elem_id="alchemy_tags_table", wrap=True)
            with gr.Accordion("Edit", open=True):
                action = gr.Radio(list(ACTIONS), value="add", label="Action", elem_id="alchemy_tags_action")
                tags = gr.Textbox(label="Tags (add / remove)", elem_id="alchemy_tags_tags",
                                  placeholder="tag one, tag two")
                with gr.Row():
                    find = gr.Textbox(label="Find (replace)", elem_id="alchemy_tags_find")
                    replacement = gr.Textbox(label="Replace with", elem_id="alchemy_tags_replacement")
                edit_form = render_options(TagEditOptions, context.defaults_for(TagEditOptions),
                                           elem_prefix="alchemy_tags_edit")
                target = gr.Radio(list(TARGETS), value=TARGETS[0], label="Apply to", elem_id="alchemy_tags_target")
                with gr.Row():
                    preview = gr.Button("Preview", elem_id="alchemy_tags_preview")
                    apply = gr.Button("Apply and save", variant="primary", elem_id="alchemy_tags_apply")
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="alchemy_tags_undo")
                    redo = gr.Button("Redo", elem_id="alchemy_tags_redo")
            status = gr.Textbox(label="Status", lines=3, interactive=False, elem_id="alchemy_tags_status")
            changes = gr.Dataframe(headers=CHANGE_HEADERS, interactive=False, wrap=True,
                                   elem_id="alchemy_tags_changes", label="Preview of the change")

    view = TagEditorView(context)
    forms = [dataset_form, select_form, list_form]
    inputs = [editor_state, folder, *dataset_form.inputs, *select_form.inputs, *list_form.inputs,
              action, tags, find, replacement, *edit_form.inputs, target, selected, caption, page]

    def parse(values) -> _Inputs:
        values = list(values)
        editor, folder_text = values.pop(0), values.pop(0)
        parsed = []
        for form in forms:
            n = len(form.inputs)
            parsed.append(form.read(values[:n]))
            del values[:n]
        action_v, tags_v, find_v, repl_v = values[:4]
        del values[:4]
        n = len(edit_form.inputs)
        edit = edit_form.read(values[:n])
        target_v, selected_v, caption_v, page_v = values[n:]
        return _Inputs(editor, folder_text or "", *parsed, action_v, tags_v or "", find_v or "", repl_v or "",
                       edit, target_v, selected_v or "", caption_v or "", int(page_v or 1))

    def guarded(method, n_out, *extra):
        def handler(*values):
            try:
                return method(parse(values), *extra)
            except AlchemyError as exc:
                return tuple(gr.update() for _ in range(n_out - 1)) + (error_text(exc),)
        return handler

    def guarded_after(method, *extra):
        # outputs: gallery, shown, table, status, changes, caption (errors keep everything but the status)
        def handler(*values):
            try:
                return method(parse(values), *extra)
            except AlchemyError as exc:
                return gr.update(), gr.update(), gr.update(), error_text(exc), gr.update(), gr.update()
        return handler

    view_outputs = [gallery, shown_state, table, status, changes, caption]

    def on_load(*values):
        try:
            return view.load(parse(values))
        except AlchemyError as exc:
            return (gr.update(),) * 4 + (error_text(exc), gr.update(), gr.update(), gr.update())

    load.click(fn=on_load, inputs=inputs, outputs=[editor_state, gallery, shown_state, table, status, changes,
                                                   selected, caption])
    apply_filter.click(fn=guarded(lambda inp: view.view(inp), 4), inputs=inputs,
                       outputs=[gallery, shown_state, table, status])
    preview.click(fn=guarded(view.preview, 2), inputs=inputs, outputs=[changes, status])
    apply.click(fn=guarded_after(view.apply), inputs=inputs, outputs=view_outputs)
    save_caption.click(fn=guarded_after(view.save_caption), inputs=inputs, outputs=view_outputs)
    undo.click(fn=guarded_after(view.undo), inputs=inputs, outputs=view_outputs)
    redo.click(fn=guarded_after(view.undo, True), inputs=inputs, outputs=view_outputs)

    def on_select(shown, editor, evt: gr.SelectData):
        return view.select_image(shown, editor, int(evt.index))

    gallery.select(fn=on_select, inputs=[shown_state, editor_state], outputs=[selected, caption])
