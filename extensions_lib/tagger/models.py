"""Finding, downloading and holding tagger models.

Models live one per folder under a models folder (`models/tagger/<name>/` inside the WebUI). A
known model can be fetched from the Hugging Face Hub at a pinned revision (the model cards ask users
to pin releases, not HEAD) straight into that folder. Offline, or when the Hub cannot be reached
within a few seconds, the download stops at once with a message naming the folder to fill and the
files it needs: it never hangs. :class:`ModelSlot` keeps at most one model loaded.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.request
from urllib.parse import urlsplit
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import AlchemyError
from .base import Tagger
from .deepdanbooru import DeepDanbooruTagger, find_deepdanbooru_checkpoint
from .wd14 import Wd14Tagger, find_wd14_files

DEFAULT_MODELS_DIR = Path("models") / "tagger"
HUB_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0
WD14_FILES = ("model.onnx", "selected_tags.csv")
DEEPDANBOORU_URL = ("https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/"
                    "model-resnet_custom_v3.pt")


@dataclass(frozen=True)
class KnownModel:
    key: str
    repo_id: str
    revision: str          # a commit id, so a re-download gives the same bytes
    onnx_sha256: str       # checked after download
    min_onnxruntime: str   # "" when any recent onnxruntime loads it


def _wd(key, revision, sha, min_ort=""):
    return KnownModel(key, f"SmilingWolf/{key}", revision, sha, min_ort)


KNOWN_MODELS: dict[str, KnownModel] = {m.key: m for m in (
    _wd("wd-eva02-large-tagger-v3", "b25b82a03f7282e41aa2f257a52c7583b710bd1c",
        "9e768793060c7939b277ccb382783e8670e8a042d29d77aa736be0c8cc898bfc", "1.17"),
    _wd("wd-vit-large-tagger-v3", "ae469aa2e4706a3af08d3673cf73a11d1add314c", "", "1.17"),
    _wd("wd-vit-tagger-v3", "7f6b584d0bd3f55c4531f14ba3d4761b2bccdc0f",
        "35f23693620b668f4d53fd3c62bf65e40af739bc52c7eb0fbc49258b58d065b6", "1.17"),
    _wd("wd-swinv2-tagger-v3", "627aef95638667ddcaa3ac8ae625e88ea5b02f51",
        "e6774bff34d43bd49f75a47db4ef217dce701c9847b546523eb85ff6dbba1db1", "1.17"),
    _wd("wd-convnext-tagger-v3", "d39e46de298d27340111b64965e20b8185c407e6",
        "1b8a7abf13d9b8368267df47501d523789c4aeae66b2296ad98483239dfa32eb", "1.17"),
    _wd("wd-v1-4-moat-tagger-v2", "8452cddf280b952281b6e102411c50e981cb2908",
        "b8cef913be4c9e8d93f9f903e74271416502ce0b4b04df0ff1e2f00df488aa03"),
    _wd("wd-v1-4-swinv2-tagger-v2", "cdb0c7fdc70646f0af29c6f80f8df564344a69b6",
        "04ec04fdf7db74b4fed7f4b52f52e04dec4dbad9e4d88d2d178f334079a29fde", "1.17"),
    _wd("wd-v1-4-convnextv2-tagger-v2", "dbd4dbe553ee51feb3bc745b614fb762080e3912",
        "e91daa19cd9e8725125b7d70702d1560855fb687f8d8c4218eddaa821f41834a"),
    _wd("wd-v1-4-convnext-tagger-v2", "4b34d1b07bdd8e95494072648960b8a6adcbc0ff",
        "71f06ecb7b9df81d8f271da4d43997ea2ed363cdac29aa64fcb256c9631e656a"),
    _wd("wd-v1-4-vit-tagger-v2", "1f3f3e8ae769634e31e1ef696df11ec37493e4f2",
        "8a21cadd1f88a095094cafbffe3028c3cc3d97f4d58c54344c5994bcf48e24ac"),
)}


def model_kind(folder: str | os.PathLike) -> str | None:
    """"wd14", "deepdanbooru" or None for a folder (or a DeepDanbooru checkpoint file)."""
    folder = Path(folder)
    if folder.is_file():
        return "deepdanbooru" if folder.suffix in (".pt", ".safetensors") else None
    if not folder.is_dir():
        return None
    if find_wd14_files(folder):
        return "wd14"
    if find_deepdanbooru_checkpoint(folder):
        return "deepdanbooru"
    return None


def list_models(models_dir: str | os.PathLike) -> dict[str, Path]:
    """{folder name: folder} of every usable model folder directly under `models_dir`."""
    root = Path(models_dir)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if not p.name.startswith(".") and model_kind(p)}


def _missing_message(key: str, target: Path) -> str:
    if key in KNOWN_MODELS:
        m = KNOWN_MODELS[key]
        return (f"put {' and '.join(WD14_FILES)} from https://huggingface.co/{m.repo_id}/tree/{m.revision} "
                f"into {target} (or run with --download while online)")
    if "deepdanbooru" in key or "deepbooru" in key:
        return f"put model-resnet_custom_v3.pt from {DEEPDANBOORU_URL} into {target}"
    return f"put model.onnx and selected_tags.csv (WD14) or a DeepDanbooru .pt into {target}"


def resolve_model(spec: str, models_dir: str | os.PathLike | None = None, *, download: bool = False,
                  report: Callable[[str], None] | None = None) -> Path:
    """The model folder for `spec`: an existing path, a folder name in `models_dir`, or a known model."""
    if not spec:
        raise AlchemyError("no tagger model given", fix="pass --model FOLDER (model.onnx + selected_tags.csv)")
    models_dir = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
    direct = Path(spec).expanduser()
    if direct.exists():
        if model_kind(direct) is None:
            raise AlchemyError("not a tagger model", direct, _missing_message(direct.name, direct))
        return direct
    named = models_dir / spec
    if model_kind(named):
        return named
    if download and spec in KNOWN_MODELS:
        return download_known_model(spec, models_dir, report=report)
    known = ", ".join(sorted(list_models(models_dir))) or "none"
    raise AlchemyError(f"tagger model {spec!r} not found (models in {models_dir}: {known})", named,
                       _missing_message(spec, named))


def _host_port(url: str, default_port: int) -> tuple[str, int] | None:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname, port or {"https": 443, "http": 80}.get(parts.scheme, default_port)


def hub_address() -> tuple[str, int]:
    """Where a download opens its first connection: the Hub endpoint (`HF_ENDPOINT`, e.g. a mirror) or,
    when the environment routes it through a proxy, that proxy. Probing huggingface.co directly would
    call a mirror or proxy user offline."""
    endpoint = _host_port(os.environ.get("HF_ENDPOINT", "").strip() or HUB_ENDPOINT, 443) or ("huggingface.co", 443)
    proxies = urllib.request.getproxies()
    proxy = proxies.get("https") or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(endpoint[0]):
        return _host_port(proxy, 1080) or endpoint
    return endpoint


def hub_reachable(timeout: float = PROBE_TIMEOUT_S, host: tuple[str, int] | None = None) -> bool:
    """True when a TCP connection to the Hub (see :func:`hub_address`) opens within `timeout` (DNS included,
    which ignores socket timeouts, hence the thread)."""
    host = host or hub_address()
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection(host, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def fetch_pinned(repo_id: str, revision: str, filenames: tuple[str, ...], target: Path, fix: str, *,
                 reachable: Callable[[], bool] = hub_reachable, report: Callable[[str], None] | None = None) -> Path:
    """Download `filenames` of a Hub repository at a pinned `revision` into `target` as real files; offline
    (``HF_HUB_OFFLINE``, or no connection within the probe time) it stops at once, saying `fix`."""
    if _offline_env():
        raise AlchemyError("cannot download while HF_HUB_OFFLINE is set", target, fix)
    if not reachable():
        host, port = hub_address()
        raise AlchemyError(f"the Hugging Face Hub cannot be reached (no connection to {host}:{port} within "
                           f"{PROBE_TIMEOUT_S:g}s; offline?)", target, fix)
    import huggingface_hub
    from huggingface_hub import hf_hub_download

    if report:
        report(f"downloading {repo_id}@{revision[:10]} into {target}")
    try:
        for filename in filenames:
            hf_hub_download(repo_id, filename, revision=revision, local_dir=str(target),
                            etag_timeout=PROBE_TIMEOUT_S, **_real_files_kwargs(huggingface_hub.__version__))
    except Exception as exc:
        raise AlchemyError(f"download of {repo_id} failed ({type(exc).__name__}: {exc})", target, fix) from None
    return target


def download_known_model(key: str, models_dir: str | os.PathLike, *,
                         reachable: Callable[[], bool] = hub_reachable,
                         report: Callable[[str], None] | None = None) -> Path:
    """Fetch a known model's files at its pinned revision into `models_dir/<key>/`."""
    model = KNOWN_MODELS[key]
    target = Path(models_dir) / key
    fetch_pinned(model.repo_id, model.revision, WD14_FILES, target, _missing_message(key, target),
                 reachable=reachable, report=report)
    if model.onnx_sha256:
        h = hashlib.sha256()
        with open(target / "model.onnx", "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        if h.hexdigest() != model.onnx_sha256:
            (target / "model.onnx").unlink(missing_ok=True)
            raise AlchemyError("downloaded model.onnx does not match the pinned checksum (removed it)", target,
                               "download again; if it keeps failing, fetch the file by hand")
    return target


def _real_files_kwargs(hub_version: str) -> dict:
    """huggingface_hub before 0.23 put large `local_dir` files in its global cache and left symlinks in the
    folder (`local_dir_use_symlinks="auto"`); ask those versions for real files. Later ones always copy
    and deprecate the argument."""
    try:
        major, minor = (int(part) for part in hub_version.split(".")[:2])
    except ValueError:
        return {}
    return {"local_dir_use_symlinks": False} if (major, minor) < (0, 23) else {}


def load_tagger(folder: str | os.PathLike, *, device: str = "auto", device_id: int = 0,
                report: Callable[[str], None] | None = None) -> Tagger:
    """Load the model in `folder` (WD14 or DeepDanbooru, told apart by the files present)."""
    kind = model_kind(folder)
    if kind == "wd14":
        return Wd14Tagger(folder, device=device, device_id=device_id, report=report)
    if kind == "deepdanbooru":
        return DeepDanbooruTagger(folder, device=device, device_id=device_id, report=report)
    raise AlchemyError("not a tagger model", folder, _missing_message(Path(folder).name, Path(folder)))


class ModelSlot:
    """Holds at most one loaded model (a tagger, or a captioner from `extensions_lib.captioners` passed
    as `loader`): loading another unloads the first, `unload()` frees it."""

    def __init__(self, loader: Callable[..., Tagger] = load_tagger):
        self._loader = loader
        self._key: tuple | None = None
        self._tagger: Tagger | None = None

    @property
    def current(self) -> Tagger | None:
        return self._tagger

    def get(self, folder: str | os.PathLike, *, loader: Callable | None = None, **kwargs) -> Tagger:
        loader = loader or self._loader
        key = (getattr(loader, "__qualname__", repr(loader)), str(Path(folder).resolve()),
               tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k != "report")))
        if self._tagger is not None and self._key == key:
            return self._tagger
        self.unload()
        self._tagger = loader(folder, **kwargs)
        self._key = key
        return self._tagger

    def unload(self) -> None:
        tagger, self._tagger, self._key = self._tagger, None, None
        if tagger is not None:
            tagger.unload()
