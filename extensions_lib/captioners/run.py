"""Caption a folder: tags, BLIP sentences and CLIP terms, one model at a time, composed and written.

Stages run one after the other over every image still to do, each model loaded into the shared
:class:`~extensions_lib.tagger.ModelSlot` (loading the next unloads the last: one model resident):
tagger scores, BLIP sentences, CLIP image features and prompts. Each stage first looks its images up
in its cache (by content hash) and runs its model on the misses only, in batches. Then captions are
composed (`compose.compose`) and written: an A1111 ``.txt`` beside each image, a kohya ``meta_cap.json``
and/or a Hugging Face ``metadata.jsonl`` at the output root, each atomically. The existing-caption
policy applies to each output on its own; an image every chosen output already has is skipped under
``skip`` without decoding it (a re-run resumes).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..atomic import atomic_open, write_text
from ..cache_dir import default_cache_dir
from ..errors import AlchemyError
from ..tagger.cache import ScoreCache, WrittenTags, content_hash
from ..tagger.captions import check_options, merge_caption
from ..tagger.image_io import ImageSkipped, decode_image, list_images
from ..tagger.options import CaptionOptions
from ..tagger.run import _check_extension, _read_existing, caption_path_for
from .cache import TextCache, pair_key, settings_digest
from .compose import Parts, clip_terms, compose
from .options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions

KOHYA_FILE = "meta_cap.json"
JSONL_FILE = "metadata.jsonl"
CPU_BATCH, GPU_BATCH = 4, 16


@dataclass
class CaptionSummary:
    total: int = 0
    done: int = 0
    kept_existing: int = 0
    written: int = 0
    inferred: dict = field(default_factory=dict)      # stage -> images its model ran on
    from_cache: dict = field(default_factory=dict)    # stage -> images served from its cache
    skipped: list[tuple[str, str]] = field(default_factory=list)
    captions: dict = field(default_factory=dict)      # image path -> composed caption
    keep_tokens: int = 0
    over_budget: int = 0
    interrupted: bool = False
    seconds: float = 0.0

    def lines(self) -> list[str]:
        head = (f"{'interrupted: ' if self.interrupted else ''}{self.written} captions written for {self.total} "
                f"images in {self.seconds:.1f}s ({self.kept_existing} kept because they have captions, "
                f"{len(self.skipped)} skipped)")
        out = [head]
        for stage in self.inferred:
            out.append(f"  {stage}: {self.inferred[stage]} inferred, {self.from_cache.get(stage, 0)} from the cache")
        if self.keep_tokens:
            out.append(f"  the first {self.keep_tokens} parts are fixed: use keep_tokens={self.keep_tokens} when "
                       f"shuffling captions")
        if self.over_budget:
            out.append(f"  {self.over_budget} captions exceed the token budget with their protected parts alone")
        out.extend(f"  skipped {image}: {reason}" for image, reason in self.skipped)
        return out


@dataclass
class _Item:
    image: Path
    rel: str                 # posix path relative to the input folder
    key: str = ""            # content hash
    tags: list = field(default_factory=list)
    sentence: str = ""
    prompt: str = ""
    features: np.ndarray | None = None


@dataclass
class Models:
    """Where each part's model comes from: resolved paths (None = that part is not made)."""

    tagger: Path | None = None
    blip: Path | None = None
    clip: Path | None = None
    clip_name: str = ""


def _read_kohya(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AlchemyError(f"not readable as JSON ({exc})", path, "fix or move the file; it is rewritten whole") \
            from None
    if not isinstance(data, dict):
        raise AlchemyError("not a kohya metadata object", path, "fix or move the file")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise AlchemyError(f"line {n} is not JSON", path, "fix or move the file; it is rewritten whole") from None
        if not isinstance(row, dict):
            raise AlchemyError(f"line {n} is not an object", path, "fix or move the file")
        rows.append(row)
    return rows


class _Outputs:
    """The chosen outputs of one run: what exists, and writing them back."""

    def __init__(self, root: Path, out_root: Path, run: CaptionRunOptions, compose_opts: ComposeOptions,
                 written: WrittenTags | None):
        self.root, self.out_root, self.run, self.opts = root, out_root, run, compose_opts
        self.kinds = list(dict.fromkeys(compose_opts.outputs)) or ["txt"]
        self.extension = _check_extension(run.caption_extension)
        self.written = written
        self.kohya = _read_kohya(out_root / KOHYA_FILE) if "kohya_json" in self.kinds else {}
        self.jsonl = _read_jsonl(out_root / JSONL_FILE) if "metadata_jsonl" in self.kinds else []
        self.jsonl_index = {str(r.get("file_name")): i for i, r in enumerate(self.jsonl)}

    def caption_path(self, image: Path) -> Path:
        return caption_path_for(image, self.root, self.run.output_dir, self.extension)

    @staticmethod
    def kohya_key(rel: str) -> str:
        return rel.rsplit(".", 1)[0]

    def existing(self, kind: str, item: _Item) -> str | None:
        if kind == "txt":
            return _read_existing(self.caption_path(item.image))
        if kind == "kohya_json":
            entry = self.kohya.get(self.kohya_key(item.rel))
            return entry.get("caption") if isinstance(entry, dict) and isinstance(entry.get("caption"), str) else None
        i = self.jsonl_index.get(item.rel)
        text = self.jsonl[i].get("text") if i is not None else None
        return text if isinstance(text, str) else None

    def has_all(self, item: _Item) -> bool:
        return all(self.existing(kind, item) is not None for kind in self.kinds)

    def put(self, item: _Item, items: list[str]) -> str:
        """Merge the new items with each output's existing caption (by the policy) and stage or write it."""
        policy_opts = CaptionOptions(existing_caption=self.opts.existing_caption, separator=self.opts.separator,
                                     trigger_tags=list(self.opts.trigger_words))
        text = ""
        for kind in self.kinds:
            existing = self.existing(kind, item)
            if existing is not None and self.opts.existing_caption == "skip":
                continue
            if kind == "txt":
                path = self.caption_path(item.image)
                before = self.written.get(path) if existing is not None and self.written is not None else []
                tags, added = merge_caption(items, existing, policy_opts, before)
                if self.written is not None:
                    self.written.put(path, added)
                text = self.opts.separator.join(tags)
                write_text(path, text)
            else:
                tags, _ = merge_caption(items, existing, policy_opts)
                text = self.opts.separator.join(tags)
                if kind == "kohya_json":
                    entry = self.kohya.get(self.kohya_key(item.rel))
                    entry = dict(entry) if isinstance(entry, dict) else {}
                    entry["caption"] = text
                    self.kohya[self.kohya_key(item.rel)] = entry
                else:
                    row = {"file_name": item.rel, "text": text}
                    if item.rel in self.jsonl_index:
                        self.jsonl[self.jsonl_index[item.rel]].update(row)
                    else:
                        self.jsonl_index[item.rel] = len(self.jsonl)
                        self.jsonl.append(row)
        return text

    def flush(self) -> None:
        if "kohya_json" in self.kinds:
            with atomic_open(self.out_root / KOHYA_FILE, "w") as fh:
                json.dump(self.kohya, fh, ensure_ascii=False, indent=2)
        if "metadata_jsonl" in self.kinds:
            with atomic_open(self.out_root / JSONL_FILE, "w") as fh:
                for row in self.jsonl:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def caption_directory(input_dir: str | os.PathLike, models: Models, run: CaptionRunOptions,
                      compose_opts: ComposeOptions, *, slot, blip_opts: BlipOptions | None = None,
                      clip_opts: InterrogateOptions | None = None, tag_opts: CaptionOptions | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None,
                      report: Callable[[str], None] | None = None) -> CaptionSummary:
    """Caption every image of `input_dir` (module docstring); `slot` holds the one loaded model."""
    root = Path(input_dir)
    if not root.is_dir():
        raise AlchemyError("input folder not found", root, "pass the folder holding the images")
    if not (models.tagger or models.blip or models.clip or compose_opts.trigger_words):
        raise AlchemyError("nothing to caption with", fix="give --blip-model, --clip-model and/or --tagger-model")
    tag_opts = check_options(tag_opts or CaptionOptions())
    blip_opts, clip_opts = blip_opts or BlipOptions(), clip_opts or InterrogateOptions()
    started = time.perf_counter()
    summary = CaptionSummary()
    cache_root = Path(run.cache_dir) if run.cache_dir else default_cache_dir()
    out_root = Path(run.output_dir) if run.output_dir else root
    outputs = _Outputs(root, out_root, run, compose_opts,
                       WrittenTags(cache_root / "captioners") if run.cache else None)
    images = list_images(root, recursive=run.recursive)
    summary.total = len(images)
    items = []
    for image in images:
        item = _Item(image, image.relative_to(root).as_posix())
        if compose_opts.existing_caption == "skip" and outputs.has_all(item):
            summary.kept_existing += 1
            continue
        items.append(item)
    stages = [s for s, on in (("tags", models.tagger), ("sentence", models.blip), ("clip", models.clip)) if on]
    total = len(items) * (len(stages) + 1)
    done = [0]

    def tick(n: int = 1) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    def stopped() -> bool:
        if should_stop and should_stop():
            summary.interrupted = True
        return summary.interrupted

    _hash_all(items, summary)
    items = [it for it in items if it.key]
    runner = _Stages(items, models, run, slot, summary, cache_root, report, tick, stopped)
    try:
        if models.tagger and not stopped():
            runner.tags(tag_opts)
        if models.blip and not stopped():
            runner.sentences(blip_opts)
        if models.clip and not stopped():
            runner.clip(clip_opts)
    except KeyboardInterrupt:
        summary.interrupted = True
    if summary.interrupted:  # captions are composed only from complete parts: write nothing half-made
        summary.seconds = time.perf_counter() - started
        return summary
    skipped = {s[0] for s in summary.skipped}
    for item in items:
        if str(item.image) in skipped:
            continue
        terms = clip_terms(item.prompt, item.sentence) if models.clip else []
        result = compose(Parts(tags=item.tags, sentence=item.sentence, clip=terms), compose_opts)
        summary.keep_tokens = max(summary.keep_tokens, result.keep_tokens)
        if compose_opts.token_budget and result.tokens > compose_opts.token_budget:
            summary.over_budget += 1
        try:
            summary.captions[str(item.image)] = outputs.put(item, result.items)
        except (OSError, AlchemyError) as exc:
            summary.skipped.append((str(item.image), f"caption not written ({exc})"))
            continue
        summary.written += 1
        tick()
    outputs.flush()
    summary.done = summary.written
    summary.seconds = time.perf_counter() - started
    if report:
        report("\n".join(summary.lines()))
    return summary


def caption_image(image: Image.Image, models: Models, run: CaptionRunOptions, compose_opts: ComposeOptions, *,
                  slot, **kwargs) -> str:
    """The caption one in-memory image gets, through the folder pipeline (same caches, same model order) in a
    scratch folder: nothing is written beside any image of the user's."""
    import dataclasses
    import tempfile

    run = dataclasses.replace(run, output_dir=None, recursive=False)
    compose_opts = dataclasses.replace(compose_opts, existing_caption="overwrite", outputs=["txt"])
    with tempfile.TemporaryDirectory(prefix="alchemy-caption-") as tmp:
        path = Path(tmp) / "image.png"
        image.convert("RGB").save(path)
        summary = caption_directory(tmp, models, run, compose_opts, slot=slot, **kwargs)
        if summary.skipped:
            raise AlchemyError(f"not captioned: {summary.skipped[0][1]}", fix="give a readable image")
        return summary.captions.get(str(path), "")


def _hash_all(items: list[_Item], summary: CaptionSummary) -> None:
    def one(item: _Item):
        try:
            item.key = content_hash(item.image.read_bytes())
        except OSError as exc:
            summary.skipped.append((str(item.image), f"unreadable ({exc.strerror or exc})"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, items))


class _Stages:
    def __init__(self, items, models: Models, run: CaptionRunOptions, slot, summary: CaptionSummary,
                 cache_root: Path, report, tick, stopped):
        self.items, self.models, self.run, self.slot, self.summary = items, models, run, slot, summary
        self.cache_root, self.report, self.tick, self.stopped = cache_root, report, tick, stopped

    def _decode(self, batch: Sequence[_Item]) -> list[tuple[_Item, Image.Image]]:
        def one(item: _Item):
            try:
                return item, decode_image(item.image, max_pixels=self.run.max_pixels)
            except ImageSkipped as exc:
                if all(image != str(item.image) for image, _ in self.summary.skipped):  # once, not per stage
                    self.summary.skipped.append((str(item.image), exc.reason))
                return item, None

        with ThreadPoolExecutor(4) as pool:
            decoded = list(pool.map(one, batch))
        return [(it, im) for it, im in decoded if im is not None]

    def _batches(self, model, todo: list[_Item]):
        size = self.run.batch_size or (GPU_BATCH if getattr(model, "on_gpu", False) else CPU_BATCH)
        for start in range(0, len(todo), size):
            if self.stopped():
                return
            yield self._decode(todo[start:start + size])

    def _count(self, stage: str, inferred: int, cached: int) -> None:
        self.summary.inferred[stage] = self.summary.inferred.get(stage, 0) + inferred
        self.summary.from_cache[stage] = self.summary.from_cache.get(stage, 0) + cached

    def tags(self, tag_opts: CaptionOptions) -> None:
        from ..tagger.base import predict_images
        from ..tagger.captions import caption_tags

        tagger = self.slot.get(self.models.tagger, device=self.run.device)
        cache = ScoreCache(self.cache_root / "tagger", tagger.model_id, len(tagger.labels)) if self.run.cache else None
        scores = {}
        todo = []
        for item in self.items:
            hit = cache.get(item.key) if cache else None
            if hit is not None:
                scores[item.key] = hit
                self.tick()
            else:
                todo.append(item)
        self._count("tags", 0, len(self.items) - len(todo))
        for batch in self._batches(tagger, todo):
            if batch:
                rows = predict_images(tagger, [im for _, im in batch], tagger.fixed_batch or len(batch))
                for (item, _), row in zip(batch, rows):
                    scores[item.key] = row
                    if cache:
                        cache.put(item.key, row)
                self._count("tags", len(batch), 0)
            self.tick(len(batch))
        for item in self.items:
            if item.key in scores:
                item.tags = caption_tags(scores[item.key], tagger.labels, tag_opts, tagger.default_thresholds)

    def sentences(self, opts: BlipOptions) -> None:
        from .blip import load_blip

        blip = self.slot.get(self.models.blip, loader=load_blip, device=self.run.device)
        cache = TextCache(self.cache_root, "blip", blip.model_id, settings_digest(opts)) if self.run.cache else None
        todo = []
        for item in self.items:
            hit = cache.get(item.key) if cache else None
            if hit is None:
                todo.append(item)
            else:
                item.sentence = hit
                self.tick()
        self._count("sentence", 0, len(self.items) - len(todo))
        for batch in self._batches(blip, todo):
            texts = blip.caption([im for _, im in batch], opts)
            for (item, _), text in zip(batch, texts):
                item.sentence = text
                if cache:
                    cache.put(item.key, text)
            self._count("sentence", len(batch), 0)
            self.tick(len(batch))

    def clip(self, opts: InterrogateOptions) -> None:
        from .clip_interrogator import Prompter, load_clip, tables_for
        from .labels import table_labels, labels_hash

        clip = self.slot.get(self.models.clip, loader=load_clip, name=self.models.clip_name, device=self.run.device)
        lists = table_labels(self.run.labels_dir)
        lists_digest = labels_hash([labels_hash(lists[n]) for n in sorted(lists)])
        prompts = TextCache(self.cache_root, "clip-prompts", clip.model_id,
                            settings_digest(opts, lists_digest)) if self.run.cache else None
        todo = []
        for item in self.items:
            hit = prompts.get(pair_key(item.key, item.sentence)) if prompts else None
            if hit is None:
                todo.append(item)
            else:
                item.prompt = hit
        self._count("clip", 0, len(self.items) - len(todo))
        if not todo:
            self.tick(len(self.items))
            return
        self.tick(len(self.items) - len(todo))
        feature_cache = (ScoreCache(self.cache_root / "clip-features", clip.model_id, clip.dim)
                         if self.run.cache and clip.dim else None)
        need = []
        for item in todo:
            item.features = feature_cache.get(item.key) if feature_cache else None
            if item.features is None:
                need.append(item)
        for batch in self._batches(clip, need):
            feats = clip.image_features([im for _, im in batch])
            for (item, _), row in zip(batch, feats):
                item.features = row
                if feature_cache:
                    feature_cache.put(item.key, row)
        if self.stopped():
            return
        if self.report:
            self.report("preparing the label tables (cached after the first run)")
        tables = clip.tables(lists_dir=self.run.labels_dir, cache_dir=self.run.labels_cache_dir or self.cache_root / "clip-interrogator",
                             chunk_size=opts.chunk_size, names=tables_for(opts.mode))
        prompter = Prompter(clip, tables, opts)
        for item in todo:
            if self.stopped():
                return
            if item.features is None:  # the image could not be decoded (already reported)
                continue
            item.prompt = prompter.prompt(item.features, item.sentence)
            if prompts:
                prompts.put(pair_key(item.key, item.sentence), item.prompt)
            self._count("clip", 1, 0)
            self.tick()
