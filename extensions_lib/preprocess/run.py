"""`alchemy preprocess`: turn a folder of images into a training-ready folder.

Every source image (sorted, so numbering is stable across runs) yields outputs named the way the
WebUI's Preprocess tab named them, `f"{index:05}-{subindex}-{stem}.png"`, each with an optional
`<same name>.txt` caption. The WebUI's dataset loader strips the leading `00000-0-` from the stem,
so an uncaptioned output still trains with the source's file name as its caption.

Unlike the WebUI, images with transparency stay RGBA: its trainers read alpha as a loss weight
(use_weight) and otherwise drop it exactly as the WebUI's RGB conversion did.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from ..atomic import atomic_path, write_text
from ..errors import AlchemyError, Cancelled
from ..faces.base import face_points
from ..options import to_dict
from ..tagger.image_io import ImageSkipped, decode_image, image_extensions
from . import autosize, focal, split
from .caption import Captioner, existing_caption_path, merge_caption, read_existing_caption
from .faces import face_crop, largest_face, needs_faces
from .journal import Journal, fingerprint, source_signature
from .options import PreprocessOptions, validate
from .resize import crop_and_resize

DEBUG_DIR = "focal-debug"
Progress = Callable[[int, int, Path], None]


@dataclass
class Derived:
    """What one source becomes before naming: images in output order, debug images, and why not more."""

    images: list[Image.Image] = field(default_factory=list)
    debug: list[Image.Image] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class PreprocessSummary:
    sources: int = 0
    processed: int = 0
    resumed: int = 0
    images_written: int = 0
    captions_written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.processed} of {self.sources} source images processed: {self.images_written} images and "
               f"{self.captions_written} captions written" + (f"; {self.resumed} already done" if self.resumed else "")]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)}:")
            out += [f"  {path}: {reason}" for path, reason in self.skipped]
        out += self.notes
        return out


def output_name(index: int, subindex: int, stem: str) -> str:
    return f"{index:05}-{subindex}-{stem}"


def derive_images(img: Image.Image, options: PreprocessOptions,
                  face_detector: focal.FaceDetector | None = None) -> Derived:
    """The WebUI's cumulative modes, in its order: split tiles, focal crop, auto-sized crop, original size;
    plain crop-and-resize only when none of them applied. A flipped copy follows each image."""
    w, h = options.width, options.height
    out = Derived()
    emitted = False
    if options.split and split.should_split(img.width, img.height, w, h, options.split_threshold):
        out.images += split.split_image(img, w, h, options.overlap_ratio)
        emitted = True
    # The WebUI focal-cropped non-square images only (its targets were square); what matters is
    # whether the aspect ratios differ, otherwise the "crop" is the whole image.
    if options.focal_crop and img.width * h != img.height * w:
        weights = focal.FocalWeights(options.focal_face_weight, options.focal_entropy_weight,
                                     options.focal_edges_weight)
        points = face_points(face_detector) if hasattr(face_detector, "detect") else face_detector
        result = focal.focal_crop(img, w, h, weights, face_detector=points)
        out.images.append(result.image)
        if options.focal_debug:
            out.debug.append(focal.debug_image(result))
        emitted = True
    if options.face_crop:
        face = largest_face(face_detector, img) if hasattr(face_detector, "detect") else None
        if face is not None:
            out.images.append(face_crop(img, face, w, h, options.face_crop_scale))
            emitted = True
        else:
            out.problems.append("no face found for the face-centred crop" if face_detector is not None
                                else "no face detector for the face-centred crop")
    if options.autosize:
        size = autosize.choose_size(
            img.width, img.height, min_dim=options.autosize_min_dim, max_dim=options.autosize_max_dim,
            min_area=options.autosize_min_area, max_area=options.autosize_max_area,
            objective=options.autosize_objective.value, threshold=options.autosize_threshold)
        if size is None:
            out.problems.append(f"no auto-sized crop for {img.width}x{img.height}: no candidate size within error "
                                f"threshold {options.autosize_threshold} and the area bounds")
        else:
            out.images.append(autosize.center_crop_resize(img, *size))
        emitted = True
    if options.keep_original_size:
        out.images.append(img)
        emitted = True
    if not emitted:
        out.images.append(crop_and_resize(img, w, h))
    if options.flip:
        out.images = [im for original in out.images for im in (original, ImageOps.mirror(original))]
    return out


def find_sources(src: Path, *, recursive: bool, exclude: Path | None = None) -> tuple[list[Path], int]:
    """(image files under `src` sorted by relative path, number of other files ignored).

    Images are recognised by extension (any Pillow can open); hidden files and `exclude` are skipped.
    """
    extensions = image_extensions()
    found, ignored = [], 0
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or root_path / d != exclude))
        if not recursive:
            dirs[:] = []
        for name in files:
            if name.startswith("."):
                continue
            path = root_path / name
            if path.suffix.lower() in extensions:
                if path.is_file():  # a FIFO or device named *.png would hang the run or fill memory
                    found.append(path)
                else:
                    ignored += 1
            elif path.suffix.lower() != ".txt":
                ignored += 1
    return sorted(found, key=lambda p: p.relative_to(src).as_posix()), ignored


def _check_dirs(src: Path, dst: Path) -> tuple[Path, Path]:
    src, dst = src.resolve(), dst.resolve()
    if not src.is_dir():
        raise AlchemyError("source folder not found", src, "pass the folder holding your images as SRC")
    if src == dst:
        raise AlchemyError("source and destination are the same folder", dst,
                           "choose a new or empty destination folder: inputs are never overwritten")
    if dst.exists() and not dst.is_dir():
        raise AlchemyError("destination exists and is not a folder", dst, "choose a folder path for DST")
    return src, dst


def _write_image(img: Image.Image, target: Path) -> None:
    with atomic_path(target) as tmp:
        img.save(tmp, format="PNG")


@dataclass
class _Run:
    """One preprocessing run's fixed inputs and running record."""

    src: Path
    dst: Path
    options: PreprocessOptions
    captioner: Captioner | None
    face_detector: focal.FaceDetector | None
    protected: set[Path]  # resolved source images and captions: never written
    journal: Journal
    summary: PreprocessSummary

    def process(self, index: int, path: Path) -> None:
        key = path.relative_to(self.src).as_posix()
        try:
            signature = source_signature(path, index)
        except OSError as exc:
            self.summary.skipped.append((key, f"cannot read ({exc.strerror or exc})"))
            return
        if self.journal.done(key, signature, self.dst) is not None:
            self.summary.resumed += 1
            return
        try:
            img = decode_image(path)  # upright RGB, or RGBA when the source has transparency
        except ImageSkipped as exc:
            self.summary.skipped.append((key, exc.reason))
            return
        existing, problem = read_existing_caption(path)
        if problem:
            self.summary.notes.append(problem)
        derived = derive_images(img, self.options, self.face_detector)
        if not derived.images:
            self.summary.skipped.append((key, "; ".join(derived.problems) or "no output"))
            return
        self.summary.notes += [f"{key}: {p}" for p in derived.problems]
        new = list(self.captioner(derived.images)) if self.captioner else [""] * len(derived.images)
        written = []
        for subindex, (image, caption) in enumerate(zip(derived.images, new)):
            written += self._write(output_name(index, subindex, path.stem), image,
                                   merge_caption(caption, existing, self.options.existing_caption))
        for n, image in enumerate(derived.debug):
            debug_path = self.dst / DEBUG_DIR / f"{output_name(index, n, path.stem)}.png"
            _write_image(image, debug_path)
            written.append(debug_path.relative_to(self.dst).as_posix())
        self.summary.images_written += len(derived.images)
        self.summary.processed += 1
        self.journal.record(key, signature, written)

    def _write(self, name: str, image: Image.Image, caption: str) -> list[str]:
        image_path, caption_path = self.dst / f"{name}.png", self.dst / f"{name}.txt"
        if image_path.resolve() in self.protected or caption_path.resolve() in self.protected:
            raise AlchemyError("an output would overwrite a source file", image_path,
                               "use a destination folder that holds no source images")
        _write_image(image, image_path)
        if not caption:
            caption_path.unlink(missing_ok=True)  # a stale caption from an earlier run would mislabel it
            return [image_path.name]
        write_text(caption_path, caption)
        self.summary.captions_written += 1
        return [image_path.name, caption_path.name]


def preprocess_directory(src: str | os.PathLike, dst: str | os.PathLike, options: PreprocessOptions, *,
                         captioner: Captioner | None = None, caption_id: str = "",
                         face_detector: focal.FaceDetector | None = None,
                         progress: Progress | None = None,
                         should_stop: Callable[[], bool] | None = None) -> PreprocessSummary:
    """Process every image in `src` into `dst`; returns what happened, including what was skipped and why.

    caption_id identifies the captioner's model and settings so a resumed run with a different tagger
    redoes its captions. face_detector: a :class:`extensions_lib.faces.FaceDetector` (see
    :func:`.faces.detector_for`) or a bare focal-point callable (:func:`focal.opencv_face_detector`). Raises Cancelled when
    `should_stop()` turns true (work done so far is kept and a re-run resumes after it).
    """
    validate(options)
    src, dst = _check_dirs(Path(src), Path(dst))
    sources, ignored = find_sources(src, recursive=options.recursive,
                                    exclude=dst if dst.is_relative_to(src) else None)
    dst.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary(sources=len(sources))
    if options.skip_flagged:
        from ..checks.scan import flagged_images

        flagged = flagged_images(src)
        kept = [p for p in sources if p.relative_to(src).as_posix() not in flagged]
        for path in sources:
            key = path.relative_to(src).as_posix()
            if key in flagged:
                summary.skipped.append((key, f"flagged in {flagged[key]}"))
        sources = kept
    if ignored:
        summary.notes.append(f"{ignored} non-image file(s) in the source were ignored")
    if needs_faces(options) and face_detector is None:
        summary.notes.append("face detection unavailable (it needs OpenCV, not installed here; "
                             "`pip install opencv-python-headless` adds it): crops used no faces")
    journal = Journal(dst, fingerprint({"options": to_dict(options), "caption": caption_id,
                                        "faces": face_detector is not None}))
    if journal.options_changed:
        summary.notes.append("options changed since the last run in this destination: every source was redone")
    # Output names are derived, so an input could only be hit through a link in dst: refuse that too.
    protected = {p.resolve() for p in sources} | {existing_caption_path(p).resolve() for p in sources}
    run = _Run(src, dst, options, captioner, face_detector, protected, journal, summary)
    try:
        for index, path in enumerate(sources):
            if should_stop is not None and should_stop():
                raise Cancelled()
            if progress is not None:
                progress(index, len(sources), path)
            run.process(index, path)
        if progress is not None and sources:
            progress(len(sources), len(sources), sources[-1])
    finally:
        journal.save()
    return summary
