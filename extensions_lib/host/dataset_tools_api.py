"""HTTP routes of the tag editor and the dataset checks, added beside the tagger's (see :mod:`.api`).

    POST /alchemy/v1/tags/list     {"folder", "dataset"?, "select"?, "list"?} -> {"tags": [[tag, count]], ...}
    POST /alchemy/v1/tags/edit     {"folder", "action": add|remove|replace, "tags"?, "find"?, "replacement"?,
                                    "images"?, "dataset"?, "select"?, "edit"?, "dry_run"?} -> the changes
    POST /alchemy/v1/tags/undo     {"folder", "dataset"?}      (and /tags/redo)
    POST /alchemy/v1/faces/folder      {"folder", "model"?, "scan"?, "wait"?}  -> 202 job (200 with "wait")
    POST /alchemy/v1/watermark/folder  {"folder", "options"?, "wait"?}
    POST /alchemy/v1/detext/folder     {"folder", "output", "options"?, "wait"?}

Option objects use the same names as the CLI flags (underscores); unknown names are a 400. Tag edits are
quick file edits and answer at once; the checks load models, so they run as jobs on the shared runner.
"""
from __future__ import annotations

from typing import Any

from .api import BadRequest, _object, existing_folder, options_from


def _editor(payload: dict):
    from ..tag_editor import TagEditor
    from ..tag_editor.options import TagDatasetOptions, TagEditOptions

    folder = existing_folder(payload.get("folder"), "dataset folder")
    dataset = options_from(TagDatasetOptions, TagDatasetOptions(), _object(payload, "dataset"), "request 'dataset'")
    edit = options_from(TagEditOptions, TagEditOptions(), _object(payload, "edit"), "request 'edit'")
    editor = TagEditor(folder, recursive=dataset.recursive, extension=dataset.caption_extension,
                       separator=edit.separator)
    return editor, edit


def _keys(editor, payload: dict) -> list[str]:
    from ..tag_editor.options import TagSelectOptions

    select = options_from(TagSelectOptions, TagSelectOptions(), _object(payload, "select"), "request 'select'")
    images = payload.get("images")
    if images is not None and (not isinstance(images, list) or not all(isinstance(i, str) for i in images)):
        raise BadRequest("'images' must be a list of image names relative to the folder")
    return editor.select(select.tag_filter(), images)


def _changes(changes) -> list[dict]:
    return [{"image": c.key, "before": c.before, "after": c.after} for c in changes]


def _scan_summary(summary) -> dict:
    if summary is None:
        return {}
    return {"total": summary.total, "flagged": summary.flagged, "moved": summary.moved,
            "skipped": [list(s) for s in summary.skipped], "manifest": str(summary.manifest or "")}


def _result(result) -> dict:
    if result is None:
        return {"changed": [], "skipped": [], "note": "nothing to do"}
    return {"label": result.label, "changed": _changes(result.changed),
            "skipped": [list(s) for s in result.skipped],
            "snapshot": str(result.snapshot) if result.snapshot else None}


class DatasetToolsApi:
    def __init__(self, api):
        self.api = api

    def tags_list(self, payload: dict):
        from ..tag_editor.options import TagListOptions

        editor, _ = _editor(payload)
        keys = _keys(editor, payload)
        listing = options_from(TagListOptions, TagListOptions(), _object(payload, "list"), "request 'list'")
        return 200, {"tags": [list(r) for r in listing.rows(editor.counts(keys))], "matched": len(keys),
                     "total": len(editor.entries), "unreadable": [list(s) for s in editor.skipped]}

    def tags_edit(self, payload: dict):
        from ..tag_editor import Edit

        editor, opts = _editor(payload)
        action = payload.get("action")
        if action == "replace":
            edit = Edit("replace", find=str(payload.get("find") or ""), replacement=str(payload.get("replacement") or ""),
                        regex=opts.regex, scope=opts.scope)
        elif action in ("add", "remove"):
            tags = payload.get("tags") or []
            tags = [tags] if isinstance(tags, str) else tags
            if not isinstance(tags, list):
                raise BadRequest("'tags' must be a list of tags or one comma-separated string")
            edit = Edit(action, tags=tuple(str(t) for t in tags), position=opts.position)
        else:
            raise BadRequest(f"unknown action {action!r}", fix="send \"action\": \"add\", \"remove\" or \"replace\"")
        keys = _keys(editor, payload)
        if payload.get("dry_run"):
            return 200, {"dry_run": True, "changed": _changes(editor.preview(edit, keys))}
        return 200, _result(editor.apply(edit, keys, allow_empty=opts.allow_empty))

    def tags_undo(self, payload: dict):
        return 200, _result(_editor(payload)[0].undo())

    def tags_redo(self, payload: dict):
        return 200, _result(_editor(payload)[0].redo())

    def faces_folder(self, payload: dict):
        from ..faces.options import FaceModelOptions, FaceScanOptions
        from ..jobs.checks import FacesRequest, faces_folder

        folder = existing_folder(payload.get("folder"), "image folder")
        request = FacesRequest(folder, options_from(FaceModelOptions, FaceModelOptions(), _object(payload, "model"),
                                                    "request 'model'"),
                               options_from(FaceScanOptions, FaceScanOptions(), _object(payload, "scan"),
                                            "request 'scan'"))
        return self._job(faces_folder, request, f"Faces in {folder.name}", "faces", payload)

    def watermark_folder(self, payload: dict):
        from ..jobs.checks import WatermarkRequest, watermark_folder
        from ..watermark.options import WatermarkOptions

        folder = existing_folder(payload.get("folder"), "image folder")
        options = options_from(WatermarkOptions, WatermarkOptions(), _object(payload, "options"), "request 'options'")
        return self._job(watermark_folder, WatermarkRequest(folder, options), f"Watermarks in {folder.name}",
                         "watermark", payload)

    def detext_folder(self, payload: dict):
        from pathlib import Path

        from ..detext.options import DetextOptions
        from ..jobs.checks import DetextRequest, detext_folder

        folder = existing_folder(payload.get("folder"), "image folder")
        output = str(payload.get("output") or "").strip()
        if not output:
            raise BadRequest("no output folder given", fix="send \"output\": \"/path/to/new/folder\"")
        options = options_from(DetextOptions, DetextOptions(), _object(payload, "options"), "request 'options'")
        return self._job(detext_folder, DetextRequest(folder, Path(output).expanduser(), options, self.api.context()),
                         f"Removing text in {folder.name}", "detext", payload)

    def _job(self, fn, request, title: str, panel: str, payload: dict):
        wait = bool(payload.get("wait"))
        p = self.api._run(fn, request, title, panel, wait=wait)
        return self.api._finished(p, lambda: _scan_summary(p.result)) if wait else self.api._accepted(p)


def routes(api, body_route) -> list[tuple[str, str, Any]]:
    """(method, path, endpoint) of these routes, for :func:`.api.register`."""
    tools = DatasetToolsApi(api)
    return [("POST", "/tags/list", body_route(tools.tags_list)), ("POST", "/tags/edit", body_route(tools.tags_edit)),
            ("POST", "/tags/undo", body_route(tools.tags_undo)), ("POST", "/tags/redo", body_route(tools.tags_redo)),
            ("POST", "/faces/folder", body_route(tools.faces_folder)),
            ("POST", "/watermark/folder", body_route(tools.watermark_folder)),
            ("POST", "/detext/folder", body_route(tools.detext_folder))]
