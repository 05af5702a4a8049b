"""The HTTP routes ``javascript/alchemy.js`` polls: the current job's progress and its latest preview.

``alchemy ui`` adds them to its own server; inside the WebUI the glue adds them in ``on_app_started``.
Both serve the same :func:`~extensions_lib.jobs.progress.progress_payload`.
"""
from __future__ import annotations

from .progress import JobRunner, progress_payload

PREFIX = "/alchemy"
NO_CACHE = {"Cache-Control": "no-store"}


def add_progress_routes(app, runner: JobRunner, prefix: str = PREFIX) -> None:
    """``GET <prefix>/progress`` (JSON) and ``GET <prefix>/progress/preview`` (the preview image, 404 when
    there is none) on a FastAPI `app`."""
    from fastapi.responses import FileResponse, JSONResponse

    def progress():
        return JSONResponse(progress_payload(runner.progress()), headers=NO_CACHE)

    def preview():
        path = runner.progress().preview
        if path is None or not path.is_file():
            return JSONResponse({"detail": "the current job has no preview image"}, status_code=404, headers=NO_CACHE)
        return FileResponse(path, headers=NO_CACHE)

    app.add_api_route(f"{prefix}/progress", progress, methods=["GET"])
    app.add_api_route(f"{prefix}/progress/preview", preview, methods=["GET"])
