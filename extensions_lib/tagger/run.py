"""Tag a folder of images: decode in threads, infer in batches, write captions atomically.

Pipeline: a bounded window of decode jobs runs in a thread pool (read bytes, hash, look up the
score cache, decode, prepare the model input) while the model runs on full batches (fixed-batch
models: their own batch size; as many calls at once as the tagger's `parallel_runs`) and a writer
thread renders and writes captions. PIL, numpy and onnxruntime/torch release the GIL, so they overlap.

Safety: an image whose caption exists under the `skip` policy is never decoded nor inferred (a re-run
resumes); captions are UTF-8 and written temp-file + rename; a caption path can never be an image
(the caption extension may not be an image extension, and two images that would share a caption file
are reported instead of one silently winning); Ctrl-C abandons the batch in flight, keeps every
caption already written and returns a summary marked interrupted; a `should_stop()` request finishes
the images already decoded first.
"""
from __future__ import annotations

import collections
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..atomic import atomic_open, write_text
from ..errors import AlchemyError
from .base import Tagger, predict_images
from .cache import ScoreCache, WrittenTags, content_hash, default_cache_dir
from .captions import caption_tags, check_options, join_caption, merge_caption, render_caption, thresholds
from .image_io import ImageSkipped, decode_image, image_extensions, list_images
from .labels import RATING
from .options import CaptionOptions, TagRunOptions

# Free-batch models on a CPU: one image per call. One WD14-sized image (tens of GMACs) already keeps
# every core busy, so batching saves nothing: batches of 2, 4 and 8 ran 2-8% slower than single
# images (bench/bench_tagger.py, ConvNeXt-Base stand-in); a GPU needs large batches to stay fed.
CPU_BATCH, GPU_BATCH = 1, 16
MANIFEST_FLOOR = 0.1


@dataclass
class RunSummary:
    total: int = 0
    inferred: int = 0             # images the model ran on
    from_cache: int = 0           # images captioned from cached scores
    kept_existing: int = 0        # skipped because a caption exists (policy "skip")
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (image, reason)
    tag_counts: collections.Counter = field(default_factory=collections.Counter)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        done = self.inferred + self.from_cache
        return done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Job:
    image: Path
    caption: Path
    key: str = ""
    array: np.ndarray | None = None
    scores: np.ndarray | None = None
    reason: str | None = None


def default_batch(tagger: Tagger) -> int:
    return GPU_BATCH if getattr(tagger, "on_gpu", False) else CPU_BATCH


def caption_path_for(image: Path, input_root: Path, output_dir: Path | None, extension: str) -> Path:
    """`<stem><extension>` beside the image, or at the mirrored place under `output_dir`."""
    if output_dir is None:
        return image.with_suffix(extension)
    return (Path(output_dir) / image.relative_to(input_root)).with_suffix(extension)


def _check_extension(extension: str) -> str:
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension or os.sep in extension:
        raise AlchemyError(f"caption extension {extension!r} must look like '.txt'", fix="use --caption-extension .txt")
    if extension.lower() in image_extensions():
        raise AlchemyError(f"caption extension {extension!r} is an image extension; captions would overwrite images",
                           fix="use --caption-extension .txt")
    return extension


def _check_manifest(path: Path) -> None:
    # The manifest is written over whatever is at its path: never let that be an image.
    if path.suffix.lower() in image_extensions():
        raise AlchemyError(f"manifest path has an image extension ({path.suffix}); it would overwrite an image",
                           path, "use a .jsonl file name for --manifest")
    if path.is_dir():
        raise AlchemyError("manifest path is a folder", path, "give a file name such as manifest.jsonl")


def plan_jobs(input_dir: Path, run: TagRunOptions, summary: RunSummary,
              policy: str) -> list[_Job]:
    """Images to process, with caption paths; existing captions (skip policy) and clashes are settled here."""
    extension = _check_extension(run.caption_extension)
    images = list_images(input_dir, recursive=run.recursive)
    summary.total = len(images)
    claimed: dict[Path, Path] = {}
    jobs = []
    for image in images:
        caption = caption_path_for(image, input_dir, run.output_dir, extension)
        if caption in claimed:
            summary.skipped.append((str(image), f"{caption.name} is already the caption of {claimed[caption].name}"))
            continue
        claimed[caption] = image
        if caption.is_dir():
            summary.skipped.append((str(image), f"{caption} is a folder"))
            continue
        if policy == "skip" and caption.is_file():
            summary.kept_existing += 1
            continue
        jobs.append(_Job(image, caption))
    return jobs


def _load(job: _Job, tagger: Tagger, cache: ScoreCache | None, max_pixels: int, want_hash: bool) -> _Job:
    """Decoder-thread work: bytes -> hash -> cached scores, or decoded and prepared model input."""
    try:
        data = job.image.read_bytes()
    except OSError as exc:
        job.reason = f"unreadable ({exc.strerror or exc})"
        return job
    if want_hash or cache is not None:
        job.key = content_hash(data)
    if cache is not None:
        job.scores = cache.get(job.key)
        if job.scores is not None:
            return job
    try:
        job.array = tagger.prepare(decode_image(data, max_pixels=max_pixels))
    except ImageSkipped as exc:
        job.reason = exc.reason
    return job


def _read_existing(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # an old caption in a legacy code page: keep its bytes readable
        return raw.decode("latin-1")


def _manifest_record(job: _Job, tagger: Tagger, tags: list[str], scores: np.ndarray, opts: CaptionOptions,
                     root: Path) -> dict:
    """One JSONL line: the written tags, every rating score, and each tag's score down to
    min(MANIFEST_FLOOR, the thresholds used), best first."""
    labels = tagger.labels
    floor = min(MANIFEST_FLOOR, *thresholds(scores, labels, opts, tagger.default_thresholds))
    above = np.flatnonzero((scores >= floor) & (labels.categories != RATING))
    above = above[np.argsort(-scores[above], kind="stable")]
    return {
        "image": job.image.relative_to(root).as_posix(),
        "caption": job.caption.as_posix(),
        "sha256": job.key,
        "tags": tags,
        "ratings": {labels.names[i]: round(float(scores[i]), 6) for i in labels.indices(RATING)},
        "scores": {labels.names[i]: round(float(scores[i]), 6) for i in above},
    }


def tag_directory(input_dir: str | os.PathLike, tagger: Tagger, caption_opts: CaptionOptions,
                  run: TagRunOptions, *, progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  report: Callable[[str], None] | None = None) -> RunSummary:
    """Caption every image in `input_dir` (see the module docstring); returns what happened.

    progress(done, total) is called as images finish; should_stop() is polled between images (the
    WebUI's interrupt button); report(text) receives the end-of-run summary.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise AlchemyError("input folder not found", input_dir, "pass the folder holding the images")
    check_options(caption_opts)
    if run.manifest is not None:
        _check_manifest(Path(run.manifest))
    started = time.perf_counter()
    summary = RunSummary()
    jobs = plan_jobs(input_dir, run, summary, caption_opts.existing_caption)
    _Pipeline(input_dir, tagger, caption_opts, run, summary, progress, should_stop).run(jobs)
    summary.seconds = time.perf_counter() - started
    if report:
        report(format_summary(summary, run.summary_top))
    return summary


class _Pipeline:
    """One directory run: decoder pool -> batched inference (`tagger.parallel_runs` calls at once) ->
    writer thread. The calling thread only hands work on, in order."""

    def __init__(self, root: Path, tagger: Tagger, caption_opts: CaptionOptions, run: TagRunOptions,
                 summary: RunSummary, progress, should_stop):
        self.root, self.tagger, self.opts, self.run_opts, self.summary = root, tagger, caption_opts, run, summary
        self.progress, self.should_stop = progress, should_stop
        cache_dir = run.cache_dir or default_cache_dir()
        self.cache = ScoreCache(cache_dir, tagger.model_id, len(tagger.labels)) if run.cache else None
        self.written = WrittenTags(cache_dir) if run.cache else None  # see captions.merge_caption
        self.batch_size = tagger.fixed_batch or run.batch_size or default_batch(tagger)
        self.runs = max(1, int(getattr(tagger, "parallel_runs", 1)))
        self.workers = run.workers or max(1, min(4, os.cpu_count() or 1))
        self.records: list[dict] = []
        self.done = 0

    def run(self, jobs: list[_Job]) -> None:
        self.done = self.summary.total - len(jobs)
        self._tick()
        # Decoded-ahead images (bounded memory): enough to fill every run's next batch while they work.
        window = max(2 * self.batch_size * self.runs, 2 * self.workers)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tagger-decode")
        infer = ThreadPoolExecutor(self.runs, thread_name_prefix="tagger-infer")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tagger-write")  # one thread: ordered, no locks
        queue: collections.deque[Future] = collections.deque()
        running: collections.deque[tuple[list[_Job], Future]] = collections.deque()
        pending = iter(jobs)
        batch: list[_Job] = []
        want_hash = bool(self.run_opts.manifest)
        try:
            while True:
                while len(queue) < window and (job := next(pending, None)) is not None:
                    queue.append(pool.submit(_load, job, self.tagger, self.cache, self.run_opts.max_pixels, want_hash))
                if not queue:
                    break
                job = queue.popleft().result()
                if job.reason is not None:
                    self.summary.skipped.append((str(job.image), job.reason))
                    self._finished(1)
                elif job.scores is not None:
                    self.writer.submit(self._write, job, job.scores, False)
                    self.summary.from_cache += 1
                    self._finished(1)
                else:
                    batch.append(job)
                    if len(batch) >= self.batch_size:
                        self._start(batch, infer, running)
                        batch = []
                if self.should_stop and self.should_stop():
                    self.summary.interrupted = True
                    break
            self._start(batch, infer, running)  # the rest, or on a stop request the images already decoded
            while running:
                self._collect(*running.popleft())
        except KeyboardInterrupt:  # batches still running are abandoned; captions written so far stay
            self.summary.interrupted = True
        finally:
            for fut in queue:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            infer.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True)
        if self.run_opts.manifest:
            self._write_manifest()

    def _tick(self) -> None:
        if self.progress:
            self.progress(self.done, self.summary.total)

    def _finished(self, n: int) -> None:
        self.done += n
        self._tick()

    def _start(self, batch: list[_Job], infer: ThreadPoolExecutor,
               running: collections.deque[tuple[list[_Job], Future]]) -> None:
        """Run the model on `batch` once a run is free (results are collected in order)."""
        if not batch:
            return
        while len(running) >= self.runs:
            self._collect(*running.popleft())
        inputs = np.stack([j.array for j in batch])
        for job in batch:
            job.array = None
        running.append((batch, infer.submit(self.tagger.predict, inputs)))

    def _collect(self, batch: list[_Job], result: Future) -> None:
        scores = result.result()
        for job, row in zip(batch, scores):
            self.writer.submit(self._write, job, row, True)
        self.summary.inferred += len(batch)
        self._finished(len(batch))

    def _write(self, job: _Job, scores: np.ndarray, inferred: bool) -> None:
        """Writer thread: cache the scores, merge with an existing caption, write it atomically, and
        remember which tags this run added (a later append/prepend replaces exactly those)."""
        opts, tagger = self.opts, self.tagger
        try:
            if self.cache is not None and inferred:
                self.cache.put(job.key, scores)
            merging = opts.existing_caption in ("append", "prepend")
            existing = _read_existing(job.caption) if merging and job.caption.exists() else None
            before = self.written.get(job.caption) if existing is not None and self.written is not None else []
            new = caption_tags(scores, tagger.labels, opts, tagger.default_thresholds)
            tags, added = merge_caption(new, existing, opts, before)
            if self.written is not None:  # first: a failure here leaves the caption as it was, and says so
                self.written.put(job.caption, added)
            write_text(job.caption, join_caption(tags, opts.separator))
        except Exception as exc:  # this runs in a thread nobody joins on results: report, never drop silently
            self.summary.skipped.append((str(job.image), f"caption not written ({type(exc).__name__}: {exc})"))
            return
        self.summary.tag_counts.update(tags)
        self.summary.written += 1
        if self.run_opts.manifest:
            self.records.append(_manifest_record(job, tagger, tags, scores, opts, self.root))

    def _write_manifest(self) -> None:
        self.records.sort(key=lambda r: r["image"])
        with atomic_open(self.run_opts.manifest, "w") as fh:
            for rec in self.records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            for image, reason in self.summary.skipped:
                fh.write(json.dumps({"image": image, "skipped": reason}, ensure_ascii=False) + "\n")


def format_summary(summary: RunSummary, top: int = 20) -> str:
    """Human-readable end-of-run report: counts, every skipped file with its reason, frequent tags."""
    lines = [f"{'interrupted: ' if summary.interrupted else ''}{summary.written} captions written for "
             f"{summary.total} images in {summary.seconds:.1f}s ({summary.inferred} inferred, {summary.from_cache} "
             f"from the score cache, {summary.kept_existing} kept because a caption exists, "
             f"{len(summary.skipped)} skipped; {summary.images_per_second:.1f} images/s)"]
    for image, reason in summary.skipped:
        lines.append(f"  skipped {image}: {reason}")
    if top and summary.tag_counts:
        common = summary.tag_counts.most_common(top)
        lines.append("most frequent tags: " + ", ".join(f"{tag} ({n})" for tag, n in common))
    return "\n".join(lines)


def caption_images(tagger: Tagger, images: Sequence[Image.Image], opts: CaptionOptions,
                   batch_size: int | None = None) -> list[str]:
    """Caption text for in-memory images (no files, no cache): the preprocessing step's entry point."""
    scores = predict_images(tagger, images, batch_size or default_batch(tagger))
    return [render_caption(row, tagger.labels, opts, tagger.default_thresholds) for row in scores]
