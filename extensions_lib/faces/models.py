"""Where face models come from: a file path, or the models folder, or (YuNet only) a pinned download.

The model table is in the README (file, size, source, licence). Both are looked up under a models
folder (``models``): YuNet in ``models/opencv/``, where the WebUI's own focal crop keeps it (so its
download is reused), the anime detector in ``models/faces/anime_face_detection/<variant>/model.onnx``.
The YuNet download goes through the tagger's offline checks (HF_HUB_OFFLINE, a short reachability
probe): offline it fails at once, naming the file to put where. The anime model has no pinned download.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import atomic_path
from ..errors import AlchemyError
from ..tagger.models import PROBE_TIMEOUT_S, _offline_env, hub_reachable


@dataclass(frozen=True)
class PinnedFile:
    filename: str
    url: str
    size: int
    sha256_prefix: str
    licence: str


YUNET = PinnedFile(
    "face_detection_yunet_2023mar.onnx",
    "https://github.com/opencv/opencv_zoo/raw/b6e370b10f641879a87890d44e42173077154a05/models/face_detection_yunet/"
    "face_detection_yunet_2023mar.onnx", 232_589, "8f2383e4", "MIT")
ANIME_SOURCE = "https://huggingface.co/deepghs/anime_face_detection (face_detect_v1.4_s/model.onnx, MIT)"
DEFAULT_MODELS_DIR = Path("models")  # the WebUI's models folder (its working directory is the WebUI root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch_pinned(file: PinnedFile, folder: str | os.PathLike, *, reachable: Callable[[], bool] | None = None,
                 report: Callable[[str], None] | None = None, timeout: float = 60.0) -> Path:
    """Download `file` into `folder` (atomically; size and checksum checked), unless it is there already."""
    target = Path(folder) / file.filename
    if target.is_file():
        return target
    how = f"put {file.filename} from {file.url} into {target.parent}"
    if _offline_env():
        raise AlchemyError("cannot download while HF_HUB_OFFLINE is set", target, how)
    host = urllib.request.urlparse(file.url).hostname or ""
    if not (reachable or (lambda: hub_reachable(host=(host, 443))))():
        raise AlchemyError(f"{host} cannot be reached within {PROBE_TIMEOUT_S:g}s (offline?)", target, how)
    if report:
        report(f"downloading {file.url} into {target.parent}")
    try:
        with urllib.request.urlopen(file.url, timeout=timeout) as response, atomic_path(target) as tmp:
            data = response.read(file.size + 1)
            if len(data) != file.size or not hashlib.sha256(data).hexdigest().startswith(file.sha256_prefix):
                raise AlchemyError(f"downloaded {file.filename} does not match the pinned size/checksum", target,
                                   "try again later, or fetch the file by hand")
            tmp.write_bytes(data)
    except OSError as exc:
        raise AlchemyError(f"download failed ({exc})", target, how) from None
    return target


def yunet_path(model: str | os.PathLike | None, models_dir: str | os.PathLike | None, *, download: bool = False,
               report: Callable[[str], None] | None = None) -> Path:
    """The YuNet file: `model` when given, else the pinned file in `models_dir` (fetched with `download`)."""
    if model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise AlchemyError("YuNet model not found", path, f"give the .onnx file ({YUNET.url})")
        return path
    folder = Path(models_dir or DEFAULT_MODELS_DIR) / "opencv"
    target = folder / YUNET.filename
    if target.is_file():
        return target
    if download:
        return fetch_pinned(YUNET, folder, report=report)
    raise AlchemyError("YuNet model not found", target, f"run with --download, or put {YUNET.filename} from "
                                                        f"{YUNET.url} there")


def anime_path(model: str | os.PathLike | None, models_dir: str | os.PathLike | None) -> Path:
    """The anime detector: `model` (a file, or a folder holding model.onnx), else the first
    ``*/model.onnx`` under `models_dir`/faces/anime_face_detection."""
    if model:
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise AlchemyError("anime face model not found", path, f"get it from {ANIME_SOURCE}")
        return path
    folder = Path(models_dir or DEFAULT_MODELS_DIR) / "faces" / "anime_face_detection"
    found = sorted(folder.glob("*/model.onnx")) + sorted(folder.glob("model.onnx"))
    if not found:
        raise AlchemyError("anime face model not found", folder,
                           f"put a model folder there (e.g. face_detect_v1.4_s/model.onnx from {ANIME_SOURCE})")
    return found[0]
