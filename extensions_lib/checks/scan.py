"""Run one check over every image of a folder, write a manifest, and flag or move what it flags.

The manifest (JSONL, written atomically at the end) holds one record per image: its path relative to the
folder, the check's fields and whether it was flagged; unreadable images get ``skipped`` with the reason
and never stop the run. "move" puts a flagged image and its caption files under ``move_to`` at the same
relative path; nothing already there is ever overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from ..atomic import atomic_open
from ..errors import AlchemyError
from ..tagger.image_io import ImageSkipped, decode_image, list_images

ACTIONS = ("flag", "move")
CAPTION_EXTENSIONS = (".txt", ".caption", ".json")


@dataclass
class ScanSummary:
    total: int = 0
    flagged: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    manifest: Path | None = None
    interrupted: bool = False

    def lines(self, what: str) -> list[str]:
        out = [f"{self.total} images checked, {len(self.flagged)} {what}"]
        if self.moved:
            out.append(f"{len(self.moved)} moved aside")
        out += [f"skipped {name}: {why}" for name, why in self.skipped]
        if self.manifest:
            out.append(f"manifest: {self.manifest}")
        return out


def sidecars(image: Path) -> list[Path]:
    """Caption files that belong to `image` (img.txt, img.png.txt, ...)."""
    found = []
    for ext in CAPTION_EXTENSIONS:
        for candidate in (image.with_suffix(ext), image.with_name(image.name + ext)):
            if candidate.is_file() and candidate not in found:
                found.append(candidate)
    return found


def move_aside(image: Path, root: Path, move_to: Path) -> str | None:
    """Move `image` and its captions under `move_to`; returns why not, or None when done."""
    targets = [(p, move_to / p.relative_to(root)) for p in [image, *sidecars(image)]]
    taken = [t for _, t in targets if t.exists()]
    if taken:
        return f"{taken[0]} already exists"
    for source, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(source), os.fspath(target))
    return None


def scan_folder(folder: str | os.PathLike, check: Callable[[Image.Image, Path], dict], flag: Callable[[dict], bool], *,
                recursive: bool = False, manifest: str | os.PathLike | None = None, action: str = "flag",
                move_to: str | os.PathLike | None = None, max_pixels: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> ScanSummary:
    """Check every image under `folder` (see the module notes): ``check(image, path) -> fields``,
    ``flag(record) -> bool``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AlchemyError("image folder not found", root, "give a folder that exists")
    if action not in ACTIONS:
        raise AlchemyError(f"action must be one of {ACTIONS}, got {action!r}")
    move_dir = Path(move_to).expanduser() if move_to else None
    if action == "move" and move_dir is None:
        raise AlchemyError("--action move needs a folder to move flagged images to", fix="pass --move-to FOLDER")
    images = list_images(root, recursive=recursive)
    if move_dir is not None and move_dir.resolve().is_relative_to(root.resolve()):
        images = [p for p in images if not p.resolve().is_relative_to(move_dir.resolve())]
    summary = ScanSummary(total=len(images))
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    for index, path in enumerate(images):
        if should_stop is not None and should_stop():
            summary.interrupted = True
            break
        key = path.relative_to(root).as_posix()
        if progress is not None:
            progress(index, len(images))
        try:
            record = {"image": key, **check(decode_image(path, **kwargs), path)}
        except ImageSkipped as exc:
            summary.skipped.append((key, exc.reason))
            summary.records.append({"image": key, "skipped": exc.reason})
            continue
        record["flagged"] = bool(flag(record))
        if record["flagged"]:
            summary.flagged.append(key)
            if action == "move":
                problem = move_aside(path, root, move_dir)
                if problem:
                    summary.skipped.append((key, f"not moved: {problem}"))
                else:
                    summary.moved.append(key)
                    record["moved_to"] = (move_dir / key).as_posix()
        summary.records.append(record)
    if progress is not None and not summary.interrupted:
        progress(len(images), len(images))
    if manifest is not None:
        summary.manifest = Path(manifest).expanduser()
        with atomic_open(summary.manifest, "w") as fh:
            for record in summary.records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return summary


MANIFESTS = ("watermarks.jsonl", "faces.jsonl")


def flagged_images(folder: str | os.PathLike, names: tuple[str, ...] = MANIFESTS) -> dict[str, str]:
    """{image path relative to `folder`: manifest that flagged it} from the check manifests found in `folder`
    (the "skip" action: flag once, then later steps leave those images out). Unreadable lines are ignored;
    names read here are only compared with a listing, never opened."""
    out: dict[str, str] = {}
    for name in names:
        path = Path(folder) / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("flagged") is True and isinstance(record.get("image"), str):
                out.setdefault(record["image"], name)
    return out
