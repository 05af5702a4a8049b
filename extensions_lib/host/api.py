"""Alchemy's HTTP API inside the WebUI (added in ``on_app_started``), with honest status codes.

Every route runs the same job functions as the tabs (``extensions_lib.jobs.dataset`` /
``extensions_lib.jobs.training``) on the same one-at-a-time runner, with options parsed by the same option dataclasses
(settings supply the defaults; an unknown option name is an error, not silently ignored).

    GET  /alchemy/v1/embeddings              embeddings the WebUI loaded (and skipped, with why)
    GET  /alchemy/v1/hypernetworks           hypernetworks the toggle can use (and skipped files)
    POST /alchemy/v1/tag/image               {"image": base64, "model"?, "options"?, "run"?} -> {"caption"}
    POST /alchemy/v1/tag/folder              {"folder", "model"?, "options"?, "run"?, "wait"?} -> 202 job
    POST /alchemy/v1/train/{method}          {"options": {...}, "wait"?} -> 202 job; one route per
                                             registered method (embedding, hypernetwork, ...)
    POST /alchemy/v1/jobs/stop               stop the running job (it saves first)
    GET  /alchemy/v1/jobs/current            the current or last job
    GET  /alchemy/v1/jobs/{job_id}           that job, while it is the current or last one

Like the WebUI's own ``/sdapi`` routes, these exist only when the WebUI runs with ``--api`` (or
``--nowebui``) and ask for HTTP basic auth when it runs with ``--api-auth user:password[,user2:password2]``:
they start jobs and read folders on the server, so a ``--listen`` WebUI without ``--api`` must not offer
them (:func:`api_switches`).

Status codes: 200 done, 202 job started (poll ``/jobs/{id}``), 400 bad request or options, 404 a folder,
model or file that does not exist, 409 another job runs (or none to stop), 422 the job ran and failed on
its input, 501 this WebUI cannot do it (the tab says why too), 503 no checkpoint loaded, 500 anything
unexpected. Errors are ``{"error", "fix", "path"}``.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..errors import AlchemyError
from ..options import from_dict, to_dict
from .jobs import Busy
from .webui_adapter import NoModelLoaded

PREFIX = "/alchemy/v1"
JOB_WAIT_S = 6 * 3600.0


class NotFound(AlchemyError):
    pass


class BadRequest(AlchemyError):
    pass


class Unsupported(AlchemyError):
    """This WebUI lacks what the feature needs (the tab shows the same reason)."""


def status_for(exc: BaseException) -> int:
    if isinstance(exc, Busy):
        return 409
    if isinstance(exc, NoModelLoaded):
        return 503
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unsupported):
        return 501
    if isinstance(exc, AlchemyError):
        return 400
    return 500


def error_body(exc: BaseException) -> dict:
    if isinstance(exc, AlchemyError):
        return {"error": exc.message, "what": exc.what, "path": exc.path, "fix": exc.fix}
    return {"error": f"unexpected error: {type(exc).__name__}: {exc}", "what": str(exc), "path": None, "fix": None}


# ---- request parsing ---------------------------------------------------------------------------------

def _object(payload: Any, key: str) -> dict:
    value = payload.get(key) or {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{key}' must be a JSON object of option names and values, got {type(value).__name__}")
    return value


def options_from(cls, base: Any, values: dict, where: str):
    """`cls` from the defaults `base` overridden by `values`; unknown names are an error."""
    return from_dict(cls, {**to_dict(base), **values}, source=where, strict=True)


def decode_image_field(text: Any):
    """A PIL image from base64 text (a ``data:image/...;base64,`` prefix is allowed)."""
    from ..tagger.image_io import ImageSkipped, decode_image

    if not isinstance(text, str) or not text.strip():
        raise BadRequest("'image' must be the image file's bytes as base64 text", fix="send {\"image\": \"iVBOR...\"}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'image' is not valid base64", fix="base64-encode the image file's bytes") from None
    try:
        return decode_image(data)
    except ImageSkipped as exc:
        raise BadRequest(f"'image' could not be read as an image: {exc}") from None


def existing_folder(value: Any, what: str) -> Path:
    text = str(value or "").strip()
    if not text:
        raise BadRequest(f"no {what} given", fix=f"send \"{what.replace(' ', '_')}\": \"/path/to/folder\"")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise NotFound(f"{what} not found", path, "give a folder that exists on the WebUI's machine")
    return path


def check_supported(context, panel: str) -> None:
    reason = context.unsupported.get(panel)
    if reason:
        raise Unsupported(reason)


def tagger_folder(context, model: str, download: bool) -> Path:
    from ..jobs.dataset import resolve_tagger

    try:
        return resolve_tagger(context, model, download=download)
    except AlchemyError as exc:
        if not str(model or "").strip():
            raise BadRequest(exc.what, exc.path, exc.fix) from None
        raise NotFound(exc.what, exc.path, exc.fix) from None


# ---- the routes ----------------------------------------------------------------------------------------

class AlchemyApi:
    """The route handlers over a runner and a ``() -> UIContext`` (rebuilt per request: settings may change).

    embeddings / hypernetworks: ``() -> list[dict]`` listings.
    """

    def __init__(self, runner, context: Callable[[], Any], embeddings: Callable[[], list[dict]],
                 hypernetworks: Callable[[], list[dict]]):
        self.runner = runner
        self.context = context
        self.embeddings = embeddings
        self.hypernetworks = hypernetworks

    # each handler returns (status, body); :func:`register` turns them into FastAPI routes
    def list_embeddings(self, payload=None):
        return 200, {"embeddings": self.embeddings()}

    def list_hypernetworks(self, payload=None):
        return 200, {"hypernetworks": self.hypernetworks()}

    def _tag_options(self, context, payload: dict):
        from ..tagger.options import CaptionOptions, TagRunOptions

        caption = options_from(CaptionOptions, context.defaults_for(CaptionOptions), _object(payload, "options"),
                               "request 'options'")
        run = options_from(TagRunOptions, context.defaults_for(TagRunOptions), _object(payload, "run"),
                           "request 'run'")
        model = str(payload.get("model") or run.model or "")
        return caption, run, model

    def tag_image(self, payload: dict):
        from ..jobs.dataset import TagImageRequest, tag_image

        context = self.context()
        check_supported(context, "tagger")
        image = decode_image_field(payload.get("image"))
        caption, run, model = self._tag_options(context, payload)
        model_dir = tagger_folder(context, model, run.download)
        request = TagImageRequest(image=image, model=str(model_dir), run=run, caption=caption, context=context)
        p = self._run(tag_image, request, "Tagging an image", "tagger", wait=True)
        return self._finished(p, lambda: {"caption": p.result})

    def tag_folder(self, payload: dict):
        from ..jobs.dataset import TagRequest, tag_folder

        context = self.context()
        check_supported(context, "tagger")
        folder = existing_folder(payload.get("folder"), "image folder")
        caption, run, model = self._tag_options(context, payload)
        model_dir = tagger_folder(context, model, run.download)
        request = TagRequest(folder=str(folder), model=str(model_dir), run=run, caption=caption, context=context)
        p = self._run(tag_folder, request, f"Tagging {folder.name}", "tagger", wait=bool(payload.get("wait")))
        return self._finished(p, lambda: _summary(p.result)) if payload.get("wait") else self._accepted(p)

    def train(self, kind: str, payload: dict):
        from ..jobs.training import TrainRequest
        from ..methods.registry import find, resolve

        try:
            method = find(kind)
        except AlchemyError as exc:
            raise NotFound(exc.what, fix=exc.fix) from None
        cls, name_option = method.train_options, method.name_option
        context = self.context()
        check_supported(context, method.train_panel)
        options = options_from(cls, context.defaults_for(cls), _object(payload, "options"), "request 'options'")
        if not getattr(options, name_option):
            raise BadRequest(f"option {name_option} is required", fix=f"send \"options\": {{\"{name_option}\": ...}}")
        existing_folder(options.data_root, "data_root folder")
        context.model()  # NoModelLoaded (503) before anything starts
        p = self._run(resolve(method.train_job), TrainRequest(options=options, context=context),
                      f"Training {method.noun} {getattr(options, name_option)}", method.train_panel,
                      wait=bool(payload.get("wait")))
        return self._finished(p, lambda: _train_result(p.result)) if payload.get("wait") else self._accepted(p)

    def stop(self, payload=None):
        if not self.runner.interrupt():
            raise Busy("no Alchemy job is running", fix="start one first")
        return 200, self._job_body(self.runner.progress())

    def current_job(self, payload=None):
        return 200, self._job_body(self.runner.progress())

    def job(self, job_id: str):
        p = self.runner.progress()
        if p.job_id != job_id:
            raise NotFound(f"no job {job_id!r} (only the current or last job is kept: {p.job_id or 'none yet'})")
        return 200, self._job_body(p)

    # --- helpers -------------------------------------------------------------------------------------
    def _run(self, job_fn, request, title: str, panel: str, *, wait: bool):
        job_id = self.runner.start(job_fn, request, title=title, panel=panel)
        return self.runner.wait(job_id, JOB_WAIT_S) if wait else self.runner.progress()

    @staticmethod
    def _job_body(p) -> dict:
        from ..jobs.progress import progress_payload

        return progress_payload(p)

    def _accepted(self, p):
        return 202, {**self._job_body(p), "poll": f"{PREFIX}/jobs/{p.job_id}"}

    def _finished(self, p, body: Callable[[], dict]):
        if p.state == "failed":
            exc = getattr(self.runner, "last_error", None)
            status = 422 if exc is None or status_for(exc) == 400 else status_for(exc)
            return status, {**self._job_body(p), "error": p.error}
        if p.state == "cancelled":
            return 200, {**self._job_body(p)}
        return 200, {**body(), **self._job_body(p)}


def _summary(summary) -> dict:
    if summary is None:
        return {}
    return {"written": summary.written, "total": summary.total, "skipped": [list(s) for s in summary.skipped],
            "interrupted": summary.interrupted}


def _train_result(result) -> dict:
    if result is None:
        return {}
    return {"step": result.step, "final_path": str(result.final_path) if result.final_path else None,
            "log_dir": str(result.log_dir), "cancelled": result.cancelled}


def api_switches(cmd_opts: Any) -> tuple[bool, dict[str, str] | None]:
    """(whether to add the routes, the ``--api-auth`` credentials or None), read from the WebUI's
    command line the way it reads them for its own API."""
    enabled = bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))
    spec = getattr(cmd_opts, "api_auth", None)
    if not spec:
        return enabled, None
    credentials = {}
    for pair in str(spec).split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            raise AlchemyError("--api-auth is not a comma-separated list of user:password pairs",
                               fix="start the WebUI with --api-auth user:password[,user2:password2]")
        credentials[user] = password
    return enabled, credentials


def _basic_auth(credentials: dict[str, str] | None):
    """A FastAPI dependency checking HTTP basic credentials (none: open, as the WebUI's API without
    ``--api-auth``)."""
    import secrets

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    if not credentials:
        return None
    basic = HTTPBasic(auto_error=False)

    def check(given=Depends(basic)) -> None:  # HTTPBasicCredentials or None; unannotated because
        # FastAPI would resolve a postponed annotation in this module's globals, where the import is not
        if given is not None:
            expected = credentials.get(given.username)
            # compare_digest on bytes: constant time, and no TypeError on non-ASCII passwords.
            if expected is not None and secrets.compare_digest(given.password.encode(), expected.encode()):
                return
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return Depends(check)


def register(app, api: AlchemyApi, prefix: str = PREFIX, *, credentials: dict[str, str] | None = None) -> None:
    """Add the routes to a FastAPI `app` (the WebUI's, from ``on_app_started``); with `credentials`
    ({user: password}) every route asks for HTTP basic auth."""
    from fastapi import Body
    from fastapi.responses import JSONResponse

    auth = _basic_auth(credentials)
    dependencies = [auth] if auth is not None else None

    def respond(handler, *args):
        try:
            status, body = handler(*args)
        except Exception as exc:  # noqa: BLE001 — every failure becomes a status code with its reason
            status, body = status_for(exc), error_body(exc)
        return JSONResponse(_jsonable(body), status_code=status, headers={"Cache-Control": "no-store"})

    def body_route(handler):
        def route(payload: dict = Body(default={})):
            return respond(handler, payload)
        return route

    def train_route(kind: str, payload: dict = Body(default={})):
        return respond(api.train, kind, payload)

    def job_route(job_id: str):
        return respond(api.job, job_id)

    routes = [("GET", "/embeddings", lambda: respond(api.list_embeddings)),
              ("GET", "/hypernetworks", lambda: respond(api.list_hypernetworks)),
              ("POST", "/tag/image", body_route(api.tag_image)),
              ("POST", "/tag/folder", body_route(api.tag_folder)),
              ("POST", "/train/{kind}", train_route),
              ("POST", "/jobs/stop", lambda: respond(api.stop)),
              ("GET", "/jobs/current", lambda: respond(api.current_job)),
              ("GET", "/jobs/{job_id}", job_route)]
    for method, path, endpoint in routes:
        app.add_api_route(prefix + path, endpoint, methods=[method], dependencies=dependencies)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
