"""Training images and their captions from one folder, by the WebUI's rules (reference 5.3-5.4).

- Every file with an image suffix in the folder (not recursive) is opened with EXIF orientation applied
  and PNG palette transparency turned into alpha; files that cannot be decoded are skipped with a reason.
- Caption = ``<stem>.txt`` beside the image (UTF-8) or else the file stem without leading digits/dashes,
  optionally reduced to ``join_string.join(re.findall(word_regex, stem))``.
- Prompt = one template line with ``[filewords]`` ← caption (tags optionally dropped/shuffled) and
  ``[name]`` ← the placeholder. Unlike the WebUI, which fixes each image's prompt once when tags are
  neither shuffled nor dropped, a line is drawn for every sample, so multi-line templates are really used.
- Size: resized (bicubic, no crop) to width × height, or with "variable size" to the image's own size
  rounded to multiples of 64.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import AlchemyError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"})
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")
SIZE_MULTIPLE = 64
TEMPLATES_DIR = Path(__file__).with_name("templates")


# ---- captions ------------------------------------------------------------------------------------

def compile_word_regex(pattern: str) -> re.Pattern | None:
    """The "filename word regex" option compiled, or None when empty; AlchemyError if it is invalid."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise AlchemyError(f"option filename_word_regex {pattern!r} is not a valid regular expression: {exc}",
                           fix="fix the pattern or leave it empty") from None
    if compiled.groups > 1:
        raise AlchemyError(f"option filename_word_regex {pattern!r} has {compiled.groups} capture groups",
                           fix="use at most one group, e.g. (?:...) for grouping without capture")
    return compiled


def caption_from_filename(stem: str, word_regex: re.Pattern | None = None, join_string: str = " ") -> str:
    """The WebUI's caption for an image without a .txt: the stem minus leading digits/dashes, then
    (when a word regex is set) the regex matches joined with `join_string`."""
    text = _LEADING_NUMBERS.sub("", stem)
    if word_regex is not None:
        text = join_string.join(word_regex.findall(text))
    return text


def read_caption(image_path: Path, word_regex: re.Pattern | None = None, join_string: str = " ") -> str:
    """Caption of one image: its ``.txt`` sidecar (surrounding whitespace removed) or its file name."""
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            return sidecar.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError:
            raise AlchemyError("caption file is not UTF-8 text", sidecar,
                               fix="re-save it as UTF-8 (or delete it to use the file name)") from None
    return caption_from_filename(image_path.stem, word_regex, join_string)


# ---- templates ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """Prompt template: one prompt per line with ``[name]`` and ``[filewords]`` placeholders."""

    lines: tuple[str, ...]
    path: Path | None = None

    @property
    def uses_filewords(self) -> bool:
        return any("[filewords]" in line for line in self.lines)


def load_template(path: str | Path, *, require_name: bool) -> Template:
    """Read a template file; blank lines are ignored.

    path: a file, or the name of one of our shipped templates ("subject_filewords", "style", ...).
    require_name: every line must contain ``[name]`` (the method trains a placeholder: a prompt without
    it would train nothing).
    """
    path = Path(path)
    if not path.is_file() and path.parent == Path("."):
        for shipped in (TEMPLATES_DIR / path.name, TEMPLATES_DIR / f"{path.name}.txt"):
            if shipped.is_file():
                path = shipped
                break
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt")))
        raise AlchemyError("prompt template file not found", path,
                           fix=f"give an existing .txt file or one of the shipped templates: {shipped}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise AlchemyError("prompt template is not UTF-8 text", path, fix="re-save it as UTF-8") from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise AlchemyError("prompt template has no prompts", path, fix="write one prompt per line, e.g. 'a photo of [name]'")
    if require_name:
        missing = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip() and "[name]" not in line]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise AlchemyError(f"prompt template line(s) {shown} lack [name]: those prompts would not contain "
                               "the trained name", path,
                               fix="add [name] to every line or pick a template such as subject_filewords.txt")
    return Template(lines, path)


def create_text(line: str, caption: str, name: str, rng: random.Random, *, shuffle_tags: bool = False,
                tag_drop_out: float = 0.0) -> str:
    """Fill one template line as the WebUI does: the caption is split on ',', each tag kept when
    ``rng.random() > tag_drop_out``, optionally shuffled, re-joined with ',' (whitespace kept)."""
    tags = caption.split(",")
    if tag_drop_out > 0:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


# ---- images ---------------------------------------------------------------------------------------

def open_image(data: bytes) -> Image.Image:
    """Decode fully (so truncation shows now), apply EXIF orientation, make palette/keyed transparency an
    alpha channel and bring 16-bit greyscale to 8 bits."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's own I→L/RGB conversion clips at 255 instead of scaling: scale 16-bit values down.
        arr = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8), "L")
    elif image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    return image


def target_size(size: tuple[int, int], width: int, height: int, varsize: bool) -> tuple[int, int]:
    """(w, h) the image is trained at: fixed, or its own size rounded (half up) to multiples of 64, at least 64."""
    if not varsize:
        return width, height
    return tuple(max(SIZE_MULTIPLE, int(s / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE) for s in size)  # type: ignore[return-value]


def to_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB CHW float32 in [-1, 1] at `size` (w, h), bicubic, like the WebUI (``x / 127.5 − 1``)."""
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def alpha_of(image: Image.Image) -> Image.Image | None:
    """The alpha band ("L" image) when the image has one."""
    return image.getchannel("A") if "A" in image.getbands() else None


def alpha_weight(alpha: Image.Image | None, latent_hw: tuple[int, int], channels: int) -> torch.Tensor:
    """Loss weight from the alpha channel at latent size: shifted to min 0 and scaled to mean 1, repeated
    over the latent channels (the WebUI's normalisation, so the loss stays comparable to unweighted).

    No alpha, or a constant one, gives all ones (the WebUI would divide by zero for constant alpha).
    """
    h, w = latent_hw
    if alpha is None:
        return torch.ones(channels, h, w)
    small = np.asarray(alpha.resize((w, h), Image.BICUBIC), dtype=np.float32)
    weight = torch.from_numpy(small.copy())
    weight = weight - weight.min()
    mean = weight.mean()
    if mean <= 0:
        return torch.ones(channels, h, w)
    return (weight / mean).expand(channels, h, w).clone()


# ---- the dataset ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageEntry:
    path: Path
    caption: str
    size: tuple[int, int]
    """(w, h) the image is trained at."""
    has_alpha: bool
    sha256: str


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class ImageDataset:
    """The usable images of a folder (sorted by file name) and the ones skipped, with reasons."""

    root: Path
    entries: list[ImageEntry]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def content_hash(self) -> str:
        """sha256 over every image's name, bytes and caption: equal folders give equal hashes."""
        h = hashlib.sha256()
        for e in self.entries:
            for part in (e.path.name, e.sha256, e.caption):
                h.update(part.encode("utf-8", "surrogateescape"))  # a non-UTF-8 file name hashes as its bytes
                h.update(b"\0")
        return h.hexdigest()

    def groups(self) -> list[list[int]]:
        """Entry indices grouped by training size (one group per distinct size), sizes in sorted order."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            by_size.setdefault(e.size, []).append(i)
        return [by_size[s] for s in sorted(by_size)]

    def load(self, index: int) -> tuple[torch.Tensor, Image.Image | None]:
        """(pixels CHW in [-1, 1] at the entry's size, alpha band at original size or None)."""
        entry = self.entries[index]
        try:
            image = open_image(entry.path.read_bytes())
        except Exception as exc:  # changed on disk since the scan
            raise AlchemyError(f"image can no longer be read ({exc})", entry.path,
                               fix="restore the file or start training again so it is skipped") from None
        return to_pixels(image, entry.size), alpha_of(image)


def scan_folder(root: str | Path, *, width: int = 512, height: int = 512, varsize: bool = False,
                filename_word_regex: str = "", filename_join_string: str = " ",
                exclude: Callable[[Path], bool] | None = None) -> ImageDataset:
    """Find, validate and caption the images of `root` (non-recursive).

    exclude: file names a method keeps out of the training set (e.g. APT's ``*_att`` masks).
    Raises AlchemyError naming the folder when it is missing or nothing in it is usable.
    """
    root = Path(root)
    if not root.is_dir():
        raise AlchemyError("dataset folder not found", root, fix="set data root to a folder of training images")
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise AlchemyError(f"training size {width}x{height} is not a multiple of 8",
                           fix="use width and height divisible by 8 (64 or more recommended)")
    regex = compile_word_regex(filename_word_regex)
    entries: list[ImageEntry] = []
    skipped: list[Skipped] = []
    for path in sorted(root.iterdir(), key=lambda p: p.name):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if exclude is not None and exclude(path):
            continue
        try:
            data = path.read_bytes()
            if not data:
                raise ValueError("empty file")
            image = open_image(data)
        except Image.DecompressionBombError as exc:
            skipped.append(Skipped(path, f"too large to decode safely ({exc})"))
            continue
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            skipped.append(Skipped(path, f"cannot be read as an image: {exc or type(exc).__name__}"))
            continue
        try:
            caption = read_caption(path, regex, filename_join_string)
        except AlchemyError as exc:
            skipped.append(Skipped(path, exc.message))
            continue
        entries.append(ImageEntry(path, caption, target_size(image.size, width, height, varsize),
                                  alpha_of(image) is not None, hashlib.sha256(data).hexdigest()))
    if not entries:
        detail = f"; skipped: {'; '.join(f'{s.path.name}: {s.reason}' for s in skipped[:5])}" if skipped else ""
        raise AlchemyError(f"no usable training images in the dataset folder{detail}", root,
                           fix=f"put .png/.jpg/.webp images there (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageDataset(root, entries, skipped)


def prompt_rng_choice(lines: Sequence[str], rng: random.Random) -> str:
    """One template line, drawn with `rng` (kept separate so the draw order is documented in one place)."""
    return lines[rng.randrange(len(lines))] if len(lines) > 1 else lines[0]
