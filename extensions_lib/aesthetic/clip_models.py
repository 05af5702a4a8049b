"""The CLIP image towers aesthetic embeddings are made with, and SD1's text projection.

- SD1: OpenAI CLIP ViT-L/14 in transformers layout (a folder with ``config.json`` and ``model.safetensors``
  or ``pytorch_model.bin``, as ``openai/clip-vit-large-patch14`` ships it). Only ``vision_model.*`` and
  ``visual_projection`` are built for encoding images; applying an embedding on SD1 reads just
  ``text_projection`` from the same weights (SD1 checkpoints carry the text tower without it).
- SD2: OpenCLIP ViT-H/14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: ``open_clip_pytorch_model.bin`` or
  ``open_clip_model.safetensors``, optional ``open_clip_config.json``); only the ``visual.*`` tower is built.
  SD2 checkpoints carry the matching text projection themselves.

A model is named by a path (file or folder), a folder name under the models folder, or nothing (the
family's known model in the models folder). ``download=True`` fetches the known model at a pinned revision
through the tagger's offline-safe mechanism: offline it stops at once, naming the folder to fill.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import AlchemyError
from ..weights_file import unwrap_state_dict
from ..tagger.models import fetch_pinned, hub_reachable

DEFAULT_CLIP_DIR = Path("models") / "aesthetic_clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"


@dataclass(frozen=True)
class KnownClip:
    key: str           # folder name under the models folder
    family: str
    repo_id: str
    revision: str      # a commit id: a re-download gives the same bytes
    files: tuple[str, ...]


KNOWN_CLIPS: dict[str, KnownClip] = {
    "sd1": KnownClip("clip-vit-large-patch14", "sd1", "openai/clip-vit-large-patch14",
                     "32bd64288804d66eefd0ccbe215aa642df71cc41", ("config.json", "model.safetensors")),
    "sd2": KnownClip("CLIP-ViT-H-14-laion2B-s32B-b79K", "sd2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                     "de081ac0a0ca8dc9d1533eed1ae884bb8ae1404b", ("open_clip_pytorch_model.bin",)),
}


def clip_kind(path: Path) -> str | None:
    """"hf" (transformers CLIP), "open_clip" or None for a folder or weights file."""
    if path.is_dir():
        if any((path / f).is_file() for f in OPEN_CLIP_WEIGHTS):
            return "open_clip"
        if (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHTS):
            return "hf"
        return None
    if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return "open_clip" if path.name.startswith("open_clip") else "hf"
    return None


def _missing_message(family: str, target: Path) -> str:
    known = KNOWN_CLIPS[family]
    return (f"put {' and '.join(known.files)} from https://huggingface.co/{known.repo_id}/tree/{known.revision} "
            f"into {target} (or run with --download while online)")


def resolve_clip(spec: str | os.PathLike | None, family: str, models_dir: str | os.PathLike | None = None, *,
                 download: bool = False, report: Callable[[str], None] | None = None) -> Path:
    """The CLIP model for `family` ("sd1"/"sd2"): `spec` as a path or a folder name under `models_dir`;
    empty means the family's known model there (downloaded first when `download`)."""
    if family not in KNOWN_CLIPS:
        raise AlchemyError(f"aesthetic gradients support SD1 and SD2 models, not {family}",
                           fix="load an SD1.x or SD2.x checkpoint")
    models_dir = Path(models_dir) if models_dir is not None else DEFAULT_CLIP_DIR
    spec = str(spec or "").strip()
    if spec:
        direct = Path(spec).expanduser()
        if direct.exists():
            if clip_kind(direct) is None:
                raise AlchemyError("not a CLIP model (no config.json + weights, no open_clip weights)", direct,
                                   _missing_message(family, direct))
            return direct
        named = models_dir / spec
        if clip_kind(named):
            return named
        raise AlchemyError(f"CLIP model {spec!r} not found", named, _missing_message(family, named))
    target = models_dir / KNOWN_CLIPS[family].key
    if clip_kind(target):
        return target
    if download:
        return download_clip(family, models_dir, report=report)
    raise AlchemyError(f"the CLIP model for {family.upper()} is not in the models folder", target,
                       _missing_message(family, target))


def download_clip(family: str, models_dir: str | os.PathLike, *, reachable: Callable[[], bool] = hub_reachable,
                  report: Callable[[str], None] | None = None) -> Path:
    """Fetch the family's known CLIP files at their pinned revision into ``models_dir/<key>/``."""
    known = KNOWN_CLIPS[family]
    target = Path(models_dir) / known.key
    return fetch_pinned(known.repo_id, known.revision, known.files, target, _missing_message(family, target),
                        reachable=reachable, report=report)


# ---- weights -------------------------------------------------------------------------------------------

def _weights_file(path: Path, names: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise AlchemyError("no weights file", path, f"put one of {', '.join(names)} there")


def read_tensors(file: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors whose key `keep` accepts; safetensors reads only those, pickles go through the safe loader."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys() if keep(k)}
    from ..safe_pickle import safe_load

    data = unwrap_state_dict(safe_load(file))
    if not isinstance(data, dict):
        raise AlchemyError("not a state dict of tensors", file, "give the CLIP model's weights file")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor) and keep(k)}


def _assign_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], file: Path) -> None:
    """Load `weights` into a module built on the meta device; every parameter must be given, shapes must match."""
    own = module.state_dict()
    for key, value in weights.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise AlchemyError(f"wrong shape for {key}: {list(value.shape)}, expected {list(own[key].shape)}", file,
                               "the file does not match its config")
    missing = [k for k, t in own.items() if k not in weights and not k.endswith("position_ids")]
    if missing:
        raise AlchemyError(f"{len(missing)} tensors missing (e.g. {missing[0]})", file,
                           "the file is not a complete CLIP model; download it again")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items() if k in own},
                          strict=False, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):  # recomputed, not read
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.position_ids = torch.arange(buf.shape[-1]).expand(buf.shape)


class ImageEncoder:
    """A CLIP image tower: ``encode(pixels)`` maps (B, 3, S, S) normalised pixels to (B, dim) features."""

    def __init__(self, module: torch.nn.Module, image_size: int, dim: int, kind: str, source: Path):
        self.module = module.eval().requires_grad_(False)
        self.image_size = image_size
        self.dim = dim
        self.kind = kind
        self.source = source

    def to(self, device) -> "ImageEncoder":
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, next(self.module.parameters()).dtype)
        if self.kind == "hf":
            return self.module(pixel_values=pixels).image_embeds.float()
        return self.module(pixels).float()


def _hf_config(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AlchemyError("no config.json next to the CLIP weights", folder,
                           _missing_message("sd1", folder))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AlchemyError(f"unreadable config.json ({exc})", config_file, "download the model again") from None
    return config


def load_hf_vision(path: Path) -> ImageEncoder:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = _hf_config(path)
    vision = dict(config.get("vision_config", config))
    if "projection_dim" in config:
        vision["projection_dim"] = config["projection_dim"]
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        vision.pop(key, None)
    cfg = CLIPVisionConfig(**vision)
    with torch.device("meta"):
        module = CLIPVisionModelWithProjection(cfg)
    file = _weights_file(path, HF_WEIGHTS)
    weights = read_tensors(file, lambda k: k.startswith(("vision_model.", "visual_projection.")))
    _assign_weights(module, weights, file)
    return ImageEncoder(module, int(cfg.image_size), int(cfg.projection_dim), "hf", path)


def _open_clip_config(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    config_file = folder / OPEN_CLIP_CONFIG
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text(encoding="utf-8"))["model_cfg"]
        except (OSError, ValueError, KeyError) as exc:
            raise AlchemyError(f"unreadable {OPEN_CLIP_CONFIG} ({exc})", config_file, "download the model again") from None
    import open_clip

    return open_clip.get_model_config("ViT-H-14")


def load_open_clip_vision(path: Path) -> ImageEncoder:
    from open_clip.model import _build_vision_tower

    cfg = _open_clip_config(path)
    with torch.device("meta"):
        visual = _build_vision_tower(int(cfg["embed_dim"]), cfg["vision_cfg"], quick_gelu=bool(cfg.get("quick_gelu")))
    file = _weights_file(path, OPEN_CLIP_WEIGHTS)
    weights = read_tensors(file, lambda k: k.startswith("visual."))
    _assign_weights(visual, {k[len("visual."):]: v for k, v in weights.items()}, file)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    return ImageEncoder(visual, int(size), int(cfg["embed_dim"]), "open_clip", path)


def load_image_encoder(path: str | os.PathLike) -> ImageEncoder:
    path = Path(path)
    kind = clip_kind(path)
    if kind == "hf":
        return load_hf_vision(path)
    if kind == "open_clip":
        return load_open_clip_vision(path)
    raise AlchemyError("not a CLIP model", path, "give a folder with config.json + model.safetensors, "
                                                 "or an OpenCLIP open_clip_pytorch_model.bin")


def load_text_projection(path: str | os.PathLike) -> torch.Tensor:
    """SD1: CLIP's text projection as a (text width, dim) matrix, so that ``features = pooled @ matrix``."""
    path = Path(path)
    if clip_kind(path) != "hf":
        raise AlchemyError("SD1 needs the transformers CLIP ViT-L/14 (its text projection)", path,
                           _missing_message("sd1", path))
    file = _weights_file(path, HF_WEIGHTS)
    found = read_tensors(file, lambda k: k == "text_projection.weight")
    if "text_projection.weight" not in found:
        raise AlchemyError("the CLIP weights have no text_projection.weight", file,
                           "use the full CLIP model (text and vision), e.g. openai/clip-vit-large-patch14")
    return found["text_projection.weight"].float().t().contiguous()
