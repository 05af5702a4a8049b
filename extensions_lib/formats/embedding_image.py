"""Embeddings stored inside images, in the two ways the WebUI writes and reads them.

1. PNG text chunk `sd-ti-embedding`: base64 of the JSON of the `.pt` dict, every tensor written as
   `{"TORCHTENSOR": nested list}`.
2. Pixels (survives conversion to other lossless formats such as WebP): the zlib-compressed JSON is
   split into high and low nibbles, each laid out as an RGB block of the image's height; the blocks
   flank the image, separated from it by one black column each. Each block's low nibbles are the data
   XOR an LCG stream; its high nibbles carry a decorative dot pattern shaded by the first vector.
   Decoding undoes this and ignores the cyclic padding after the zlib stream.

The layout must match the host bit for bit, so the constants below are the host's.
"""
from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import AlchemyError
from ..names import is_valid_name
from .embedding import Embedding, embedding_from_data, name_from_path

TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
_CHANNELS = 3
_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32
_DOT, _DOT_PITCH, _DOT_STAGGER = 6, 8, 4
_EDGE_VALUES = 1024

MAX_PIXELS = 4096 * 2048
"""Largest embedding image decoded (checked from the header, before decoding): a zlib bomb in a small PNG's
pixels would otherwise cost gigabytes. Previews plus data blocks of any real embedding fit far below it."""
MAX_JSON_BYTES = 8 << 20
"""Largest embedded JSON unpacked (from base64 text or the zlib stream in the pixels); a 75-vector 2048-wide
embedding needs about 4 MB."""


# --- JSON with tensors ------------------------------------------------------------------------------

def _tensor_to_json(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {TENSOR_KEY: obj.detach().cpu().numpy().tolist()}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json_to_tensor(obj: dict) -> Any:
    if TENSOR_KEY in obj:
        return torch.from_numpy(np.array(obj[TENSOR_KEY]))
    return obj


def data_to_json(data: dict) -> str:
    return json.dumps(data, default=_tensor_to_json)


def json_to_data(text: str | bytes) -> dict:
    return json.loads(text, object_hook=_json_to_tensor)


def data_to_b64(data: dict) -> bytes:
    return base64.b64encode(data_to_json(data).encode())


def b64_to_data(text: str | bytes) -> dict:
    if len(text) > MAX_JSON_BYTES * 4 // 3 + 4:
        raise AlchemyError(f"the embedded text is {len(text)} bytes; more than an embedding ever needs")
    return json_to_data(base64.b64decode(text))


# --- pixel codec ------------------------------------------------------------------------------------

def lcg_mask(count: int) -> np.ndarray:
    """The host's scrambling stream: LCG from seed 0, each output `seed % 255`, kept to its low nibble.

    Computed a block at a time: `block` LCG steps are one affine map `s -> a_B*s + c_B (mod 2**32)`,
    applied to the previous block as a whole (a large embedding image needs about a million values).
    """
    block = max(1, min(count, 4096))
    seeds = np.empty(count, dtype=np.uint64)
    seed = 0
    for i in range(min(count, block)):
        seed = (_LCG_A * seed + _LCG_C) % _LCG_M
        seeds[i] = seed
    a_block, c_block = np.uint64(pow(_LCG_A, block, _LCG_M)), np.uint64(seed)  # seed: block steps from 0
    for start in range(block, count, block):
        n = min(block, count - start)
        seeds[start:start + n] = (seeds[start - block:start - block + n] * a_block + c_block) % np.uint64(_LCG_M)
    return (seeds % np.uint64(255)).astype(np.uint8) & 0x0F


def xor_block(block: np.ndarray) -> np.ndarray:
    """Scramble (or unscramble: it is its own inverse) a block's low nibbles."""
    return block.astype(np.uint8) ^ lcg_mask(block.size).reshape(block.shape)


def style_block(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Put the dot pattern into the block's high nibbles (purely decorative; decoding drops it)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-_DOT, canvas.size[0], _DOT_PITCH):
        for row, y in enumerate(range(-_DOT, canvas.size[1], _DOT_PITCH)):
            off = _DOT_STAGGER if row % 2 == 0 else 0
            shade = int(shades[i % len(shades)])
            i += 1
            draw.ellipse((x + off, y, x + _DOT + off, y + _DOT), fill=(shade, shade, shade))
    return block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0)


def _edge_shades(data: dict) -> np.ndarray:
    first = next(iter(data["string_to_param"].values()))
    values = np.abs(np.asarray(first.detach().cpu().numpy().tolist()[0][:_EDGE_VALUES], dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.nan_to_num(values / np.max(values) * 255)
    return scaled.astype(np.uint8)


def _nibble_block(nibbles: np.ndarray, height: int) -> np.ndarray:
    # Both steps always add (even when already divisible) and padding repeats the data cyclically.
    size = len(nibbles) + (height - len(nibbles) % height)
    size = size + (height * _CHANNELS - size % (height * _CHANNELS))
    return np.resize(nibbles, size).reshape(height, -1, _CHANNELS)


def insert_pixel_data(image, data: dict):
    """`image` flanked by the two data blocks (a new RGB image, 2 + block widths wider)."""
    from PIL import Image

    payload = np.frombuffer(zlib.compress(data_to_json(data).encode(), level=9), np.uint8)
    height = image.size[1]
    shades = _edge_shades(data)
    low = xor_block(style_block(_nibble_block(payload & 0x0F, height), shades))
    high = xor_block(style_block(_nibble_block(payload >> 4, height), shades[::-1]))
    im_low, im_high = Image.fromarray(low, "RGB"), Image.fromarray(high, "RGB")
    out = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, height), (0, 0, 0))
    out.paste(im_low, (0, 0))
    out.paste(image.convert("RGB"), (im_low.size[0] + 1, 0))
    out.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def _crop_black(arr: np.ndarray) -> np.ndarray:
    mask = (arr > 0).all(axis=2)
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    if not cols.any():
        return arr[:0, :0]
    c0, c1 = cols.argmax(), len(cols) - cols[::-1].argmax()
    r0, r1 = rows.argmax(), len(rows) - rows[::-1].argmax()
    return arr[r0:r1, c0:c1]


def extract_pixel_data(image) -> dict | None:
    """The dict hidden in the pixels, or None when the image has no data blocks."""
    arr = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    separators = np.where(arr.sum(axis=(0, 2)) == 0)[0]
    if len(separators) < 2:
        return None
    lower = xor_block(arr[:, :separators.min(), :])
    upper = xor_block(arr[:, separators.max() + 1:, :])
    if lower.shape != upper.shape:
        return None
    raw = ((upper << 4) | lower).flatten().tobytes()
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(raw, MAX_JSON_BYTES)  # trailing padding is ignored
    except zlib.error:
        return None
    if inflate.unconsumed_tail:
        raise AlchemyError(f"the data in the pixels unpacks to more than {MAX_JSON_BYTES} bytes "
                           "(a decompression bomb, not an embedding)")
    try:
        return json_to_data(text)
    except ValueError:
        return None


# --- files ------------------------------------------------------------------------------------------

_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _check_png_text_chunks(path: str) -> None:
    """Refuse a PNG whose text chunks are larger than any embedding's, before Pillow reads them into memory
    (it keeps up to 64 MB of text). Only chunk headers are read; other formats pass unchecked."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return
        for _ in range(1 << 16):
            header = fh.read(8)
            if len(header) < 8:
                return
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in _TEXT_CHUNKS and length > MAX_JSON_BYTES * 4 // 3 + 64:
                raise AlchemyError(f"its {kind.decode('latin-1')} chunk holds {length} bytes; an embedding's text is "
                                   f"at most {MAX_JSON_BYTES * 4 // 3} bytes", path,
                                   "this is not an embedding image; move it out of the embeddings folder")
            if kind == b"IEND":
                return
            fh.seek(length + 4, os.SEEK_CUR)


def read_embedding_image(path: str | os.PathLike) -> Embedding:
    """PNG/WebP/...: text chunk first (PNG), else pixels. Named by the `name` stored inside, as the host does."""
    from PIL import Image

    path = os.fspath(path)
    _check_png_text_chunks(path)
    try:
        with Image.open(path) as image:
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise AlchemyError(f"the image is {image.size[0]}x{image.size[1]} pixels; embedding images are "
                                   f"decoded only up to {MAX_PIXELS} pixels", path,
                                   "this is not an embedding image; move it out of the embeddings folder")
            image.load()
            text = getattr(image, "text", {}) or {}
            data = b64_to_data(text[TEXT_KEY]) if TEXT_KEY in text else extract_pixel_data(image)
    except AlchemyError as exc:
        if exc.path is None:
            raise AlchemyError(exc.what, path, "this is not an embedding image; move it out of the embeddings "
                                               "folder") from None
        raise
    except Exception as exc:
        raise AlchemyError(f"cannot read the embedding in this image ({type(exc).__name__}: {exc})", path,
                           "the image is damaged or was re-encoded lossily; use the original file") from exc
    if data is None:
        raise AlchemyError("this image holds no embedding", path,
                           "use an image saved with embedding data, or re-save it losslessly (PNG/WebP)")
    # The stored name is untrusted: it becomes the run's log folder and snapshot names when trained.
    name = data.get("name") if isinstance(data, dict) else None
    return embedding_from_data(data, name if is_valid_name(name) else name_from_path(path), path)


def image_data(embedding: Embedding) -> dict[str, Any]:
    from .embedding_pt import embedding_pt_dict

    if embedding.is_sdxl:
        raise ValueError("SDXL embeddings cannot be stored in images (the WebUI's image form holds one tensor)")
    return embedding_pt_dict(embedding)


def save_embedding_image(embedding: Embedding, path: str | os.PathLike, preview=None, *,
                         text_chunk: bool = True, pixels: bool = True) -> Path:
    """Write `preview` (default: a plain grey square) carrying the embedding; atomic.

    PNG gets the text chunk and/or the pixel blocks; WebP (lossless) can only carry pixels.
    """
    from PIL import Image, PngImagePlugin

    target = Path(path)
    fmt = {".png": "PNG", ".webp": "WEBP"}.get(target.suffix.lower())
    if fmt is None:
        raise AlchemyError(f"cannot store an embedding in a '{target.suffix}' image", target, "use .png or .webp")
    if fmt == "WEBP" and not pixels:
        raise ValueError("a WebP image can carry an embedding only in its pixels")
    if not (text_chunk or pixels):
        raise ValueError("choose the text chunk, the pixels, or both")
    data = image_data(embedding)
    image = (preview if preview is not None else Image.new("RGB", (256, 256), (128, 128, 128))).convert("RGB")
    if pixels:
        image = insert_pixel_data(image, data)
        if extract_pixel_data(image) is None:  # the host's decoder crops black edges: make sure we survive it
            raise AlchemyError("the preview image defeats the pixel encoding (its edges decode as black)", target,
                               "use a preview that is not black at the top/bottom, or text_chunk only")
    kwargs: dict[str, Any] = {"lossless": True, "quality": 100} if fmt == "WEBP" else {}
    if fmt == "PNG" and text_chunk:
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_KEY, data_to_b64(data))
        kwargs["pnginfo"] = info
    with atomic_path(target) as tmp:
        image.save(tmp, format=fmt, **kwargs)
    return target
