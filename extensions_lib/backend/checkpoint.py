"""Read WebUI single-file checkpoints safely and tell what model they hold.

- :func:`open_checkpoint`: ``.safetensors`` tensor by tensor (plain reads, no memory map), ``.ckpt``/``.pt`` through the
  restricted unpickler (weights optionally wrapped in ``{"state_dict": ...}``). The format is sniffed from
  the first bytes, not trusted from the suffix.
- :func:`detect`: family from the tensors as the WebUI does (text-encoder layout, context width, UNet input
  channels), overridden by a ``<checkpoint>.yaml`` beside the file.
- :func:`probe_is_v`: the WebUI's v-prediction test for SD2 (one UNet forward, see the function).
- :func:`short_hash`: the WebUI's short hash, sha256 of the whole file, first 10 hex digits (cached).

Every problem a user can fix raises :class:`~extensions_lib.errors.AlchemyError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AlchemyError
from ..weights_file import unwrap_state_dict
from . import keymap

FIX_REDOWNLOAD = "download or copy the checkpoint again"
_UNET_IN = keymap.UNET_PREFIX + "input_blocks.0.0.weight"
_SDXL_MARKER = "conditioner.embedders."


# --- reading --------------------------------------------------------------------------------------------

class CheckpointReader:
    """Keys, shapes and tensors of one checkpoint file; use as a context manager.

    ``take(key)`` hands a tensor over and forgets it where possible, so a loader converting key by key
    never holds the whole file twice. A loader that copies each tensor right away (converting fp16 to
    fp32, say) passes one ``scratch`` buffer to every ``take``: the file's bytes are read into it and no
    per-tensor source is allocated and freed, which would leave the heap full of holes the converted
    tensors do not fit (about 5% of the weights for SD1 fp16 -> fp32).
    """

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * torch.empty((), dtype=self.dtype(key)).element_size()

    def take(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor of `key`. `scratch` (uint8, at least :meth:`nbytes` long): a reader may return a view
        of it instead of memory of the tensor's own, valid until the next ``take`` into the same buffer."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _SafetensorsReader(CheckpointReader):
    """Each tensor read with plain file reads into memory of its own.

    No memory map: a mapped file's pages count toward the process's memory while the map lives, and a
    tensor viewing the map (safetensors' ``get_tensor``) keeps all of it alive, so a loader converting
    fp16 to fp32 would peak at the converted weights plus the whole file.
    """

    def __init__(self, path: Path, header: dict, data_start: int):
        self.path = path
        self._header = {k: v for k, v in header.items() if k != "__metadata__"}
        self._data_start = data_start
        self._fh = open(path, "rb", buffering=0)

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES.get(self._header[key]["dtype"], torch.uint8)

    def nbytes(self, key: str) -> int:
        begin, end = self._header[key]["data_offsets"]
        return int(end) - int(begin)

    def take(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._header[key]
        begin, end = (int(x) for x in entry["data_offsets"])
        if scratch is not None and scratch.dtype == torch.uint8 and scratch.numel() >= end - begin:
            buffer = scratch[:end - begin]
        else:
            buffer = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        self._fh.seek(self._data_start + begin)
        while done < len(view):
            got = self._fh.readinto(view[done:])
            if not got:
                raise AlchemyError(f"truncated .safetensors file: tensor {key!r} is cut off", self.path,
                                   FIX_REDOWNLOAD)
            done += got
        if sys.byteorder != "little" and _DTYPE_SIZES[entry["dtype"]] > 1:
            raise AlchemyError("safetensors files are little-endian; this machine is not", self.path,
                               "load the file on a little-endian machine")
        return buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(self.shape(key))

    def close(self) -> None:
        self._fh.close()


class _PickleReader(CheckpointReader):
    def __init__(self, path: Path, state_dict: dict[str, torch.Tensor]):
        self.path = path
        self._sd = state_dict

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd[key].dtype

    def take(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        return self._sd.pop(key)      # already in memory: nothing to gain from the scratch buffer

    def close(self) -> None:
        self._sd = {}


def _check_file(path: Path) -> int:
    if path.is_dir():
        raise AlchemyError("is a folder, not a checkpoint file", path,
                           "pass the .safetensors or .ckpt file itself (a diffusers folder is not supported)")
    if not path.exists():
        raise AlchemyError("checkpoint file not found", path, "check the path")
    size = path.stat().st_size
    if size == 0:
        raise AlchemyError("checkpoint file is empty (0 bytes)", path, FIX_REDOWNLOAD)
    return size


def _safetensors_header(path: Path, size: int, head: bytes) -> tuple[dict, int] | None:
    """(the parsed JSON header, where the data starts) if the file starts like a safetensors file, else None.

    Every entry's declared dtype, shape and byte range are checked here, before anything is allocated.
    """
    if len(head) < 9:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or length > 100_000_000:
        return None
    if 8 + length > size:
        raise AlchemyError("truncated .safetensors file: its header is cut off", path, FIX_REDOWNLOAD)
    with open(path, "rb") as fh:
        fh.seek(8)
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise AlchemyError(f"damaged .safetensors header ({exc})", path, FIX_REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise AlchemyError("damaged .safetensors header (not a JSON object)", path, FIX_REDOWNLOAD)
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(int(n) for n in shape)
            valid = (dtype in _DTYPE_SIZES and all(int(n) >= 0 for n in shape)
                     and 0 <= int(begin) <= int(stop) and int(stop) - int(begin) == count * _DTYPE_SIZES[dtype])
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise AlchemyError(f"damaged .safetensors header: bad entry for {key!r}", path, FIX_REDOWNLOAD)
        end = max(end, int(stop))
    if 8 + length + end > size:
        raise AlchemyError(f"truncated .safetensors file: {size} bytes, the header needs {8 + length + end}",
                           path, FIX_REDOWNLOAD)
    return header, 8 + length


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    obj = unwrap_state_dict(obj)
    if not isinstance(obj, dict) or not obj:
        raise AlchemyError("not a model checkpoint: the file holds no tensor dictionary", path,
                           "choose a Stable Diffusion .safetensors or .ckpt file")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise AlchemyError("not a model checkpoint: the file holds no tensors", path,
                           "choose a Stable Diffusion .safetensors or .ckpt file")
    return tensors


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open `path` for reading (format sniffed from its first bytes)."""
    path = Path(path)
    size = _check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    parsed = _safetensors_header(path, size, head)
    if parsed is not None:
        return _SafetensorsReader(path, *parsed)
    if head[:2] == b"PK" or head[:1] == b"\x80":       # torch zip archive / legacy pickle
        from ..safe_pickle import safe_load

        return _PickleReader(path, _unwrap_state_dict(safe_load(path), path))
    raise AlchemyError("not a checkpoint: neither a .safetensors nor a PyTorch file", path,
                       "choose a Stable Diffusion .safetensors or .ckpt file")


# --- detection ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detected:
    """What a checkpoint holds. prediction_type is None when only a UNet forward can tell (SD2)."""

    family: str                 # "sd1" | "sd2"
    prediction_type: str | None
    context_dim: int
    unet_channels: int          # width of the first UNet level (320 for real models)
    text_width: int
    source: str                 # "tensors" or the yaml that decided


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AlchemyError(f"cannot read the config yaml ({exc})".replace("\n", " "), path,
                           "fix or delete the .yaml beside the checkpoint") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise AlchemyError("not an LDM model config (no 'model:' section)", path,
                           "fix or delete the .yaml beside the checkpoint")
    return data["model"]


def yaml_overrides(checkpoint: Path) -> tuple[Path, dict] | None:
    """(yaml path, {"family"?, "prediction_type"?}) from ``<checkpoint>.yaml`` if it exists."""
    path = checkpoint.with_suffix(".yaml")
    if not path.is_file():
        return None
    model = _read_yaml(path)
    params = model.get("params") or {}
    out = {}
    target = str(model.get("target", ""))
    if target.startswith("sgm."):
        raise AlchemyError("the config describes an SDXL model, which the standalone backend cannot load", path,
                           "use an SD1.x or SD2.x checkpoint, or run inside the WebUI")
    parameterization = params.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise AlchemyError(f"unsupported parameterization {parameterization!r}", path, "use 'eps' or 'v'")
    out["prediction_type"] = parameterization
    cond = str((params.get("cond_stage_config") or {}).get("target", ""))
    if "FrozenOpenCLIPEmbedder" in cond:
        out["family"] = "sd2"
    elif "FrozenCLIPEmbedder" in cond:
        out["family"] = "sd1"
    in_channels = ((params.get("unet_config") or {}).get("params") or {}).get("in_channels")
    if in_channels not in (None, 4):
        raise AlchemyError(f"the config describes a UNet with {in_channels} input channels (inpainting?), "
                           "which the standalone backend cannot load", path, "use a normal txt2img checkpoint")
    return path, out


def _first_shape(reader: CheckpointReader, suffix: str) -> tuple[int, ...] | None:
    for key in reader.keys():
        if key.startswith(keymap.UNET_PREFIX) and key.endswith(suffix):
            return reader.shape(key)
    return None


def detect(reader: CheckpointReader) -> Detected:
    """Family, context width and (for SD1, or from a yaml) prediction type of an open checkpoint."""
    path = reader.path
    keys = reader.keys()
    if any(k.startswith(_SDXL_MARKER) for k in keys):
        raise AlchemyError("this is an SDXL checkpoint, which the standalone backend cannot load", path,
                           "use an SD1.x or SD2.x checkpoint, or run inside the WebUI")
    if _UNET_IN not in keys:
        raise AlchemyError("not a Stable Diffusion checkpoint: no UNet weights (model.diffusion_model.*)", path,
                           "choose a full SD1.x/SD2.x checkpoint, not a VAE, LoRA or embedding")
    in_shape = reader.shape(_UNET_IN)
    if len(in_shape) != 4:
        raise AlchemyError(f"unknown architecture: UNet input conv has shape {list(in_shape)}", path,
                           "choose an SD1.x or SD2.x checkpoint")
    if in_shape[1] == 9:
        raise AlchemyError("this is an inpainting checkpoint (9 UNet input channels), which the standalone "
                           "backend cannot load", path, "use a normal txt2img checkpoint")
    if in_shape[1] != 4:
        raise AlchemyError(f"unknown architecture: UNet takes {in_shape[1]} input channels, expected 4", path,
                           "choose an SD1.x or SD2.x checkpoint")
    if any(k.startswith(keymap.OPEN_CLIP_PREFIX) for k in keys):
        family, width_key = "sd2", keymap.OPEN_CLIP_PREFIX + "token_embedding.weight"
    elif any(k.startswith(keymap.CLIP_PREFIX) for k in keys):
        family, width_key = "sd1", keymap.CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
    else:
        raise AlchemyError("unknown architecture: no text encoder (cond_stage_model.transformer.* for SD1, "
                           "cond_stage_model.model.* for SD2)", path, "choose a full SD1.x/SD2.x checkpoint")
    if width_key not in keys:      # early SD1 files lack the "text_model." level
        width_key = width_key.replace("text_model.", "")
    if width_key not in keys:
        raise AlchemyError(f"damaged checkpoint: missing {width_key}", path, FIX_REDOWNLOAD)
    context = _first_shape(reader, "attn2.to_k.weight")
    if context is None:
        raise AlchemyError("unknown architecture: the UNet has no cross-attention", path,
                           "choose an SD1.x or SD2.x checkpoint")
    detected = Detected(family=family, prediction_type="eps" if family == "sd1" else None,
                        context_dim=int(context[1]), unet_channels=int(in_shape[0]),
                        text_width=int(reader.shape(width_key)[1]), source="tensors")
    override = yaml_overrides(Path(path))
    if override:
        yaml_path, values = override
        detected = Detected(**{**detected.__dict__, **values, "source": str(yaml_path)})
    return detected


@torch.no_grad()
def probe_is_v(unet: torch.nn.Module, context_dim: int) -> bool:
    """The WebUI's SD2 v-prediction test (``sd_models_config.is_using_v_parameterization_for_sd2``).

    At t=999 the latent is almost pure noise: an eps model returns about its input, a v model about
    ``-x0``, far below it. The WebUI feeds x = 0.5 everywhere with a constant 0.5 context and calls it v
    when mean(out - x) < -1. Deterministic for given weights.
    """
    param = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    cond = torch.full((1, 2, context_dim), 0.5, device=param.device, dtype=param.dtype)
    t = torch.tensor([999], device=param.device)
    out = unet(x, t, encoder_hidden_states=cond).sample
    return (out.float() - x.float()).mean().item() < -1


# --- hashing --------------------------------------------------------------------------------------------

def short_hash(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The WebUI's checkpoint short hash: sha256 of the whole file, first 10 hex digits (cached per file
    version, see :mod:`.hash_cache`)."""
    from .hash_cache import cached_sha256

    return cached_sha256(path, cache_dir)[:10]
