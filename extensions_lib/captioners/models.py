"""Finding and downloading captioner weights: BLIP folders and open_clip CLIP checkpoints.

They live under one models folder (``models/captioners`` by default, inside the WebUI its
``models/captioners``): one folder per BLIP model (a transformers folder: config.json, the processor
files, model.safetensors or pytorch_model.bin) and a ``clip/`` folder for CLIP weights. Downloads are
the tagger's: offline (``HF_HUB_OFFLINE``) or with the Hub unreachable within a few seconds they stop
at once with a message naming the folder and files to fill, never hang.

Pins: BLIP-base is fetched at a fixed Hub commit; OpenAI's ViT-L/14 URL carries its sha256, which is
checked. BLIP-large and LAION's ViT-H/14 are fetched from the repository's current revision (their
commit ids could not be verified offline when this was written): the message says so.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import AlchemyError
from ..tagger.models import PROBE_TIMEOUT_S, _offline_env, _real_files_kwargs, hub_address, hub_reachable

DEFAULT_MODELS_DIR = Path("models") / "captioners"
BLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
BLIP_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt")


@dataclass(frozen=True)
class KnownBlip:
    key: str
    repo_id: str
    revision: str | None     # a commit id; None = the repository's current revision (not pinned)
    weights: str


KNOWN_BLIP: dict[str, KnownBlip] = {m.key: m for m in (
    KnownBlip("blip-base", "Salesforce/blip-image-captioning-base", "82a37760796d32b1411fe092ab5d4e227313294b",
              "pytorch_model.bin"),
    KnownBlip("blip-large", "Salesforce/blip-image-captioning-large", None, "model.safetensors"),
)}

# CLIP interrogator models: the SD version they go with, and open_clip's (architecture, pretrained tag).
CLIP_FOR_SD = {"sd1": "ViT-L-14/openai", "sd2": "ViT-H-14/laion2b_s32b_b79k"}


def is_blip_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and any((folder / w).is_file() for w in BLIP_WEIGHTS)


def _blip_help(key: str, target: Path) -> str:
    known = KNOWN_BLIP.get(key)
    if known:
        rev = known.revision or "main"
        return (f"put {', '.join(BLIP_FILES)} and {known.weights} from https://huggingface.co/{known.repo_id}/tree/"
                f"{rev} into {target} (or run with --download while online)")
    return f"put a transformers BLIP captioning folder (config.json, processor files, weights) at {target}"


def resolve_blip(spec: str, models_dir: str | os.PathLike | None = None, *, download: bool = False,
                 report: Callable[[str], None] | None = None, reachable: Callable[[], bool] = hub_reachable) -> Path:
    """The BLIP folder for `spec`: a folder path, a folder name in `models_dir`, or a known model key."""
    if not spec:
        raise AlchemyError("no BLIP model given", fix="pass --blip-model blip-base (with --download once) or a folder")
    models_dir = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
    direct = Path(spec).expanduser()
    if direct.exists():
        if not is_blip_folder(direct):
            raise AlchemyError("not a BLIP model folder", direct, _blip_help(direct.name, direct))
        return direct
    named = models_dir / spec
    if is_blip_folder(named):
        return named
    if download and spec in KNOWN_BLIP:
        return _download_blip(KNOWN_BLIP[spec], named, report, reachable)
    known = ", ".join(sorted(p.name for p in models_dir.iterdir() if is_blip_folder(p))) if models_dir.is_dir() else ""
    raise AlchemyError(f"BLIP model {spec!r} not found (BLIP folders in {models_dir}: {known or 'none'}; "
                       f"known for --download: {', '.join(KNOWN_BLIP)})", named, _blip_help(spec, named))


def _check_online(target: Path, help_text: str, reachable: Callable[[], bool], host: tuple[str, int] | None = None):
    if _offline_env():
        raise AlchemyError("cannot download while HF_HUB_OFFLINE is set", target, help_text)
    if not reachable():
        host = host or hub_address()
        raise AlchemyError(f"cannot reach {host[0]}:{host[1]} within {PROBE_TIMEOUT_S:g}s (offline?)", target,
                           help_text)


def _download_blip(model: KnownBlip, target: Path, report, reachable) -> Path:
    _check_online(target, _blip_help(model.key, target), reachable)
    import huggingface_hub
    from huggingface_hub import hf_hub_download

    if report:
        pin = model.revision[:10] if model.revision else "main (not pinned)"
        report(f"downloading {model.repo_id}@{pin} into {target}")
    try:
        for filename in (*BLIP_FILES, model.weights):
            hf_hub_download(model.repo_id, filename, revision=model.revision, local_dir=str(target),
                            etag_timeout=PROBE_TIMEOUT_S, **_real_files_kwargs(huggingface_hub.__version__))
    except Exception as exc:
        raise AlchemyError(f"download of {model.repo_id} failed ({type(exc).__name__}: {exc})", target,
                           _blip_help(model.key, target)) from None
    return target


# ---- CLIP ------------------------------------------------------------------------------------------

def clip_name(spec: str) -> str:
    """'sd1'/'sd2' or 'ARCH/TAG' -> 'ARCH/TAG' (the name the label cache files are keyed by)."""
    return CLIP_FOR_SD.get(spec, spec)


def _clip_help(name: str, target: Path) -> str:
    import open_clip

    arch, _, tag = name.partition("/")
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if cfg.get("url"):
        return f"put {cfg['url']} into {target} (or run with --download while online), or pass --clip-path FILE"
    if cfg.get("hf_hub"):
        return (f"put open_clip_pytorch_model.bin from https://huggingface.co/{cfg['hf_hub'].rstrip('/')} into "
                f"{target} (or run with --download while online), or pass --clip-path FILE")
    return "pass --clip-path with a weights file or an open_clip folder (open_clip_config.json + weights)"


def clip_weights_path(name: str, models_dir: str | os.PathLike | None = None, *, download: bool = False,
                      report: Callable[[str], None] | None = None,
                      reachable: Callable[[], bool] | None = None) -> Path:
    """Where the weights of open_clip model `name` (ARCH/TAG) are, fetching them with `download`."""
    import open_clip

    arch, _, tag = clip_name(name).partition("/")
    target = (Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR) / "clip"
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if not cfg:
        raise AlchemyError(f"unknown CLIP model {name!r}", fix="use sd1 (ViT-L-14/openai), sd2 (ViT-H-14/"
                           "laion2b_s32b_b79k), another open_clip ARCH/TAG, or --clip-path")
    url, hub = cfg.get("url") or "", (cfg.get("hf_hub") or "").rstrip("/")
    local = target / (os.path.basename(url) if url else f"{hub.replace('/', '_')}_open_clip_pytorch_model.bin")
    if local.is_file():
        return local
    if not download:
        raise AlchemyError(f"CLIP weights for {name} not found", local, _clip_help(clip_name(name), target))
    if url:
        host = (urllib.request.urlparse(url).hostname or "", 443)
        _check_online(local, _clip_help(clip_name(name), target),
                      reachable or (lambda: hub_reachable(host=host)), host)
        return _download_url(url, local, report)
    _check_online(local, _clip_help(clip_name(name), target), reachable or hub_reachable)
    import huggingface_hub
    from huggingface_hub import hf_hub_download

    if report:
        report(f"downloading {hub} (current revision, not pinned) into {target}")
    try:
        got = hf_hub_download(hub, "open_clip_pytorch_model.bin", local_dir=str(target / hub.replace("/", "_")),
                              etag_timeout=PROBE_TIMEOUT_S, **_real_files_kwargs(huggingface_hub.__version__))
    except Exception as exc:
        raise AlchemyError(f"download of {hub} failed ({type(exc).__name__}: {exc})", local,
                           _clip_help(clip_name(name), target)) from None
    os.replace(got, local)
    return local


def _download_url(url: str, target: Path, report) -> Path:
    """OpenAI's weights: the URL's second-to-last part is the file's sha256, checked before it is kept."""
    from ..atomic import atomic_path

    expected = url.rstrip("/").split("/")[-2]
    if report:
        report(f"downloading {url} into {target.parent}")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                while block := response.read(1 << 22):
                    h.update(block)
                    out.write(block)
            if len(expected) == 64 and h.hexdigest() != expected:
                raise AlchemyError("downloaded file does not match the sha256 in its URL", target, "download again")
    except OSError as exc:
        raise AlchemyError(f"download failed ({exc})", target, _clip_help("", target.parent)) from None
    return target
