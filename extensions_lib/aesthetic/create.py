"""Make an aesthetic embedding: the mean of normalised CLIP image features over the images of a folder.

The original averaged unnormalised features (and normalised only when applying); the paper averages
normalised ones, which keeps one very "loud" image from dominating. We follow the paper; both are
normalised before use, so files of either kind apply the same way.

Preprocessing is CLIP's own: shorter side resized to the tower's input size (bicubic), centre crop,
OpenAI mean/std (OpenCLIP ViT-H uses the same constants). Images are decoded one at a time and encoded in
batches; unreadable ones are skipped with their reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import AlchemyError
from ..tagger.image_io import ImageSkipped, decode_image, list_images
from .clip_models import OPENAI_MEAN, OPENAI_STD, ImageEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tiff", ".tif", ".webp", ".bmp")
Progress = Callable[[int, int], None]


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) normalised pixels: resize the shorter side to `size` (bicubic), centre crop."""
    if image.mode == "RGBA":  # transparent areas count as white, as they are shown
        backdrop = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(backdrop, image)
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.array(OPENAI_MEAN, dtype=np.float32)) / np.array(OPENAI_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class CreateResult:
    vector: torch.Tensor            # (dim,) float32: mean of the normalised features
    used: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def embed_folder(encoder: ImageEncoder, folder: str | os.PathLike, batch_size: int = 256,
                 progress: Progress | None = None) -> CreateResult:
    """Encode every image directly in `folder` (not subfolders, as the original) and average.

    progress(done, total) is called after each batch; it may raise ``Cancelled``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AlchemyError("image folder not found", folder, "give the folder holding the style's images")
    if batch_size < 1:
        raise AlchemyError(f"batch size must be at least 1, got {batch_size}")
    files = list_images(folder, extensions=IMAGE_SUFFIXES)
    if not files:
        raise AlchemyError("no images in the folder", folder, f"put {', '.join(IMAGE_SUFFIXES)} files directly in it")
    total = torch.zeros(encoder.dim, dtype=torch.float64)
    used, skipped, batch = 0, [], []

    def flush():
        nonlocal total, used
        if batch:
            features = encoder.encode(torch.stack(batch)).double().cpu()
            total += (features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).sum(0)
            used += len(batch)
            batch.clear()

    for i, path in enumerate(files, 1):
        try:
            batch.append(clip_pixels(decode_image(path), encoder.image_size))
        except ImageSkipped as exc:
            skipped.append((path, exc.reason))
        if len(batch) >= batch_size or i == len(files):
            flush()
            if progress is not None:
                progress(i, len(files))
    if used == 0:
        raise AlchemyError(f"none of the {len(files)} images could be read (first: {skipped[0][1]})", folder,
                           "check the files")
    return CreateResult((total / used).float(), used, skipped)


def create_embedding(encoder: ImageEncoder, folder: str | os.PathLike, out: str | os.PathLike,
                     batch_size: int = 256, progress: Progress | None = None,
                     overwrite: bool = False) -> tuple[Path, CreateResult]:
    """Embed `folder` and write the original's ``[1, dim]`` ``.pt`` to `out` (atomic)."""
    from .file import save_aesthetic

    out = Path(out)
    if out.exists() and not overwrite:
        raise AlchemyError("file already exists", out, "choose another name or allow overwriting")
    result = embed_folder(encoder, folder, batch_size, progress)
    return save_aesthetic(result.vector, out), result



def create_from_options(opts, out_dir: str | os.PathLike, clip_dir: str | os.PathLike | None = None,
                        progress: Progress | None = None, report: Callable[[str], None] | None = None,
                        device: str | torch.device = "cpu") -> tuple[Path, CreateResult]:
    """The create job every front end runs: resolve (or download) the CLIP model, encode, write
    ``<out_dir>/<name>.pt``. `opts` is a :class:`~extensions_lib.aesthetic.options.CreateOptions`."""
    from .clip_models import load_image_encoder, resolve_clip
    from .file import SUFFIX, check_name

    name = check_name(opts.name)
    if opts.source is None:
        raise AlchemyError("no image folder given", fix="pass the folder of images in the style (--source)")
    out = Path(out_dir) / f"{name}{SUFFIX}"
    if out.exists() and not opts.overwrite:
        raise AlchemyError("an aesthetic embedding of that name exists", out, "choose another name or allow overwrite")
    clip = resolve_clip(opts.clip, opts.family, clip_dir, download=opts.download, report=report)
    if report:
        report(f"encoding images with {clip}")
    encoder = load_image_encoder(clip).to(device)
    try:
        return create_embedding(encoder, opts.source, out, opts.batch_size, progress, overwrite=opts.overwrite)
    finally:
        del encoder
