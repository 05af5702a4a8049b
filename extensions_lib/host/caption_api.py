"""The captioning routes of Alchemy's HTTP API (registered beside the tagger's in ``host/api.py``).

    POST /alchemy/v1/caption/image   {"image": base64, "run"?, "compose"?, "blip"?, "clip"?, "tags"?} -> {"caption"}
    POST /alchemy/v1/caption/folder  {"folder", "run"?, ..., "wait"?} -> 202 job (or the summary with wait)

Each options object is the same dataclass the CLI and the Captions tab use (unknown names are an error).
"""
from __future__ import annotations

from .api import BadRequest, NotFound, _object, check_supported, decode_image_field, existing_folder, options_from

ROUTES = (("POST", "/caption/image", "caption_image"), ("POST", "/caption/folder", "caption_folder"))


def _options(context, payload: dict) -> dict:
    from ..captioners.options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions
    from ..tagger.options import CaptionOptions

    classes = {"run": CaptionRunOptions, "compose": ComposeOptions, "blip": BlipOptions, "clip": InterrogateOptions,
               "tags": CaptionOptions}
    return {key: options_from(cls, context.defaults_for(cls), _object(payload, key), f"request '{key}'")
            for key, cls in classes.items()}


def _check_models(context, run) -> None:
    """A model that is not there is a 404 before any job starts (as for the tagger routes)."""
    from ..commands.captions import resolve_models
    from ..errors import AlchemyError
    from ..jobs.captions import _run_options

    if not (run.blip_model or run.clip_model or run.clip_path or run.tagger_model):
        raise BadRequest("no captioning model given", fix='send "run": {"blip_model": ..., "clip_model": ...}')
    try:
        resolve_models(_run_options(context, run), report=None)
    except AlchemyError as exc:
        raise NotFound(exc.what, exc.path, exc.fix) from None


class CaptionApi:
    """Handlers over an :class:`~extensions_lib.host.api.AlchemyApi` (its runner and context)."""

    def __init__(self, api):
        self.api = api

    def caption_image(self, payload: dict):
        from ..jobs.captions import CaptionRequest, caption_image

        context = self.api.context()
        check_supported(context, "captions")
        image = decode_image_field(payload.get("image"))
        opts = _options(context, payload)
        _check_models(context, opts["run"])
        p = self.api._run(caption_image, CaptionRequest(image=image, context=context, **opts),
                          "Captioning an image", "captions", wait=True)
        return self.api._finished(p, lambda: {"caption": p.result})

    def caption_folder(self, payload: dict):
        from ..jobs.captions import CaptionRequest, caption_folder

        context = self.api.context()
        check_supported(context, "captions")
        folder = existing_folder(payload.get("folder"), "image folder")
        opts = _options(context, payload)
        _check_models(context, opts["run"])
        wait = bool(payload.get("wait"))
        p = self.api._run(caption_folder, CaptionRequest(folder=str(folder), context=context, **opts),
                          f"Captioning {folder.name}", "captions", wait=wait)
        if not wait:
            return self.api._accepted(p)
        return self.api._finished(p, lambda: _summary(p.result))


def _summary(summary) -> dict:
    if summary is None:
        return {}
    return {"written": summary.written, "total": summary.total, "kept_existing": summary.kept_existing,
            "skipped": [list(s) for s in summary.skipped], "keep_tokens": summary.keep_tokens,
            "interrupted": summary.interrupted}


def routes(api, body_route) -> list[tuple[str, str, object]]:
    """(method, path, endpoint) for ``host.api.register``; `body_route` wraps a handler taking the JSON body."""
    handlers = CaptionApi(api)
    return [(method, path, body_route(getattr(handlers, name))) for method, path, name in ROUTES]
