"""The create job the Train tab's "Create aesthetic embedding" sub-tab and the API run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Cancelled
from .clip_models import DEFAULT_CLIP_DIR
from .file import DEFAULT_DIR

FOLDER = "aesthetic_embeddings"
CLIP_FOLDER = "aesthetic_clip"


def aesthetic_folders(context: Any) -> tuple[Path, Path]:
    """(aesthetic embeddings folder, CLIP models folder) of a UIContext: its ``folders`` when the host gives
    them, else beside the hypernetworks folder (both live in the WebUI's ``models/``)."""
    folders = getattr(context, "folders", {}) or {}
    base = Path(context.hypernetworks_dir).parent
    embeddings = Path(folders.get(FOLDER, base / DEFAULT_DIR.name))
    clip = Path(folders.get(CLIP_FOLDER, base / DEFAULT_CLIP_DIR.name))
    return embeddings, clip


def create_aesthetic_file(request, job=None) -> Path:
    """Encode the options' image folder into ``<aesthetic folder>/<name>.pt``; progress per batch, stoppable."""
    import torch

    from .create import create_from_options

    embeddings, clip = aesthetic_folders(request.context)

    def progress(done: int, total: int) -> None:
        if job is not None:
            if job.should_stop():
                raise Cancelled()
            job.update(step=done, total=total, unit="image", message=f"encoded {done} of {total} images")

    def report(line: str) -> None:
        if job is not None:
            job.update(message=line)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path, result = create_from_options(request.options, embeddings, clip, progress, report, device=device)
    if job is not None:
        skipped = f"; skipped {len(result.skipped)} unreadable" if result.skipped else ""
        job.update(message=f"{result.used} images{skipped}")
    request.context.files_changed(FOLDER)
    return path
