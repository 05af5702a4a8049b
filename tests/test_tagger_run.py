"""Directory tagging: captions on disk, batching, resume, cache re-render, odd files, Ctrl-C."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.tagger.captions import format_tag
from extensions_lib.tagger import (CaptionOptions, TagRunOptions, decode_image, load_tagger, predict_images,
                                   render_caption, tag_directory)
from tagger_models import make_wd14_folder, random_image

GOOD = ["a_rgb.png", "b_rgba.png", "c.jpg", "d_palette.png", "e_la.png", "f_16bit.png", "g_cmyk.jpg",
        "h_anim.gif", "i_wide.webp", "j_small.bmp", "k_tall.png"]
BAD = {"x_empty.png": "empty", "y_text.jpg": "not an image", "z_truncated.png": "", "w_bomb.png": "limit"}


def _save(image: Image.Image, path: Path, **kw) -> None:
    buf = io.BytesIO()
    image.save(buf, kw.pop("format", None) or Image.registered_extensions()[path.suffix.lower()], **kw)
    path.write_bytes(buf.getvalue())


def _png_header_only(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def make_dataset(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _save(random_image(rng, 60, 40), root / "a_rgb.png")
    _save(random_image(rng, 40, 60, "RGBA"), root / "b_rgba.png")
    _save(random_image(rng, 80, 50), root / "c.jpg", quality=95)
    _save(random_image(rng, 50, 50).quantize(16), root / "d_palette.png", transparency=0)
    _save(random_image(rng, 30, 45, "L").convert("LA"), root / "e_la.png")
    _save(Image.fromarray((np.asarray(random_image(rng, 40, 40, "L"), np.uint16) * 257)), root / "f_16bit.png")
    _save(random_image(rng, 50, 30).convert("CMYK"), root / "g_cmyk.jpg")
    frames = [random_image(rng, 36, 36) for _ in range(2)]
    _save(frames[0], root / "h_anim.gif", save_all=True, append_images=frames[1:], duration=40)
    _save(random_image(rng, 90, 30), root / "i_wide.webp", lossless=True)
    _save(random_image(rng, 12, 9), root / "j_small.bmp")
    _save(random_image(rng, 20, 70), root / "k_tall.png")
    (root / "x_empty.png").write_bytes(b"")
    (root / "y_text.jpg").write_text("not an image", encoding="utf-8")
    good_png = io.BytesIO()
    random_image(rng, 64, 64).save(good_png, "PNG")
    (root / "z_truncated.png").write_bytes(good_png.getvalue()[:300])
    (root / "w_bomb.png").write_bytes(_png_header_only(60000, 60000))
    return root


class Counting:
    """A tagger wrapper that counts predicted images and can fail on a chosen call."""

    def __init__(self, inner, fail_on_call: int | None = None, exc: BaseException | None = None):
        self.inner, self.calls, self.images = inner, 0, 0
        self.fail_on_call, self.exc = fail_on_call, exc
        self.lock = threading.Lock()  # the pipeline may run several predict calls at once

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, batch):
        with self.lock:
            self.calls += 1
            if self.fail_on_call is not None and self.calls >= self.fail_on_call:
                raise self.exc
            self.images += len(batch)
        return self.inner.predict(batch)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"free": load_tagger(make_wd14_folder(root / "free", seed=3)),
            "fixed": load_tagger(make_wd14_folder(root / "fixed", seed=3, free_batch=False))}


OPTS = CaptionOptions(general_threshold=0.5, character_threshold=0.5, rating="first")


def run_opts(tmp_path: Path, **kw) -> TagRunOptions:
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("workers", 2)
    return TagRunOptions(**kw)


def captions_of(folder: Path, ext=".txt") -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*" + ext))}


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.suffix != ".txt"
            and p.is_file()}


def test_captions_beside_images_equal_direct_rendering(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    before = file_hashes(data)
    summary = tag_directory(data, models["free"], OPTS, run_opts(tmp_path, batch_size=4))
    written = captions_of(data)
    assert sorted(written) == sorted(Path(n).with_suffix(".txt").name for n in GOOD)
    for name in GOOD:
        scores = predict_images(models["free"], [decode_image(data / name)])[0]
        assert written[Path(name).with_suffix(".txt").name] == render_caption(scores, models["free"].labels, OPTS)
    skipped = {Path(p).name: reason for p, reason in summary.skipped}
    assert set(skipped) == set(BAD)
    for name, word in BAD.items():
        assert word in skipped[name]
    assert summary.inferred == len(GOOD) and summary.written == len(GOOD) and summary.total == len(GOOD) + len(BAD)
    counts = collections.Counter(t for text in written.values() for t in text.split(", "))
    assert summary.tag_counts == counts
    assert file_hashes(data) == before, "an image file changed"
    assert not list(data.glob(".*.tmp")), "temporary files left behind"


def test_batched_fixed_and_single_runs_write_identical_captions(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    results = []
    for tagger, batch in ((models["free"], 4), (models["free"], 1), (models["fixed"], 4)):
        out = tmp_path / f"out-{tagger.fixed_batch}-{batch}"
        counting = Counting(tagger)
        tag_directory(data, counting, OPTS, run_opts(tmp_path, batch_size=batch, output_dir=out, cache=False))
        expected_calls = len(GOOD) if (tagger.fixed_batch or batch == 1) else -(-len(GOOD) // 4)
        assert counting.calls == expected_calls
        results.append(captions_of(out))
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == len(GOOD) and len(set(results[0].values())) > 3


class Overlapping(Counting):
    """Makes each predict call last long enough for concurrent calls to meet, and records how many did."""

    def __init__(self, inner, parallel_runs: int):
        super().__init__(inner)
        self.parallel_runs, self.active, self.most = parallel_runs, 0, 0

    def predict(self, batch):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.05)
            return super().predict(batch)
        finally:
            with self.lock:
                self.active -= 1


def test_parallel_runs_overlap_and_write_the_same_captions(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    results = {}
    for runs in (1, 3):
        tagger = Overlapping(models["free"], runs)
        out = tmp_path / f"out-{runs}"
        summary = tag_directory(data, tagger, OPTS, run_opts(tmp_path, batch_size=2, output_dir=out, cache=False))
        assert tagger.most == runs and summary.inferred == len(GOOD) and tagger.images == len(GOOD)
        results[runs] = captions_of(out)
    assert results[1] == results[3] and len(results[1]) == len(GOOD)


def test_skip_policy_resumes_without_decoding_or_inference(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path, cache=False))
    first = captions_of(data)
    (data / "c.txt").unlink()
    (data / "k_tall.txt").write_text("hand written, keep me", encoding="utf-8")
    counting = Counting(models["free"])
    summary = tag_directory(data, counting, OPTS, run_opts(tmp_path, cache=False))
    assert counting.images == 1 and summary.kept_existing == len(GOOD) - 1
    after = captions_of(data)
    assert after["c.txt"] == first["c.txt"] and after["k_tall.txt"] == "hand written, keep me"


def test_cache_rerender_equals_a_fresh_run(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path))
    changed = CaptionOptions(general_threshold=0.4, character_threshold=0.3, rating="last", sort="alphabetical",
                             exclude=["/.*hair/"], trigger_tags=["sks"], existing_caption="overwrite")
    no_model = Counting(models["free"], fail_on_call=1, exc=AssertionError("the model ran despite the cache"))
    summary = tag_directory(data, no_model, changed, run_opts(tmp_path))
    assert summary.from_cache == len(GOOD) and summary.inferred == 0
    fresh_dir = tmp_path / "fresh"
    tag_directory(data, models["free"], changed, run_opts(tmp_path, cache=False, output_dir=fresh_dir))
    assert captions_of(data) == captions_of(fresh_dir)
    assert captions_of(data) != {}


def test_replaced_image_is_not_served_stale_scores(tmp_path, models):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(11)
    random_image(rng, 50, 50).save(data / "img.png")
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path))
    random_image(rng, 70, 30).save(data / "img.png")  # same name, new content
    counting = Counting(models["free"])
    tag_directory(data, counting, dataclasses.replace(OPTS, existing_caption="overwrite"), run_opts(tmp_path))
    assert counting.images == 1


def test_recursive_input_mirrors_into_output_dir(tmp_path, models):
    data = tmp_path / "data"
    rng = np.random.default_rng(5)
    for rel in ("top.png", "sub/one.png", "sub/deeper/two.jpg"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        random_image(rng, 40, 30).save(data / rel)
    out = tmp_path / "captions"
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path, recursive=True, output_dir=out))
    assert sorted(captions_of(out)) == ["sub/deeper/two.txt", "sub/one.txt", "top.txt"]
    assert captions_of(data) == {}
    flat = tag_directory(data, models["free"], OPTS, run_opts(tmp_path, output_dir=tmp_path / "flat"))
    assert flat.total == 1


def test_images_are_never_overwritten(tmp_path, models):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    random_image(rng, 30, 30).save(data / "same.png")
    random_image(rng, 30, 30).save(data / "same.jpg")
    before = file_hashes(data)
    with pytest.raises(AlchemyError, match="image extension"):
        tag_directory(data, models["free"], OPTS, run_opts(tmp_path, caption_extension=".png"))
    summary = tag_directory(data, models["free"], OPTS, run_opts(tmp_path))
    assert [Path(p).name for p, _ in summary.skipped] == ["same.png"]
    assert "already the caption of same.jpg" in summary.skipped[0][1]
    assert file_hashes(data) == before and (data / "same.txt").is_file()


def test_append_and_prepend_on_disk_drop_duplicates(tmp_path, models):
    data = tmp_path / "data"
    data.mkdir()
    random_image(np.random.default_rng(9), 40, 40).save(data / "p.png")
    fresh = render_caption(predict_images(models["free"], [decode_image(data / "p.png")])[0],
                           models["free"].labels, OPTS).split(", ")
    (data / "p.txt").write_text(f"my tag, {fresh[1].upper()}", encoding="utf-8")
    tag_directory(data, models["free"], dataclasses.replace(OPTS, existing_caption="append"), run_opts(tmp_path))
    assert (data / "p.txt").read_text(encoding="utf-8") == ", ".join(["my tag", fresh[1].upper()] +
                                                                     [t for t in fresh if t != fresh[1]])
    (data / "p.txt").write_text("my tag", encoding="utf-8")
    tag_directory(data, models["free"], dataclasses.replace(OPTS, existing_caption="prepend"), run_opts(tmp_path))
    assert (data / "p.txt").read_text(encoding="utf-8") == ", ".join(fresh + ["my tag"])


@pytest.mark.parametrize("policy", ["append", "prepend"])
def test_rerender_replaces_the_earlier_runs_tags_and_keeps_the_users(tmp_path, models, policy):
    tagger = models["free"]
    data = tmp_path / "data"
    data.mkdir()
    random_image(np.random.default_rng(4), 40, 40).save(data / "p.png")
    scores = predict_images(tagger, [decode_image(data / "p.png")])[0]
    first = dataclasses.replace(OPTS, existing_caption=policy, trigger_tags=["sks"])
    general = [(float(scores[i]), format_tag(tagger.labels.names[i], first)) for i in tagger.labels.indices(0)
               if scores[i] >= first.general_threshold]
    (low, shared), (next_low, _), *_, (_, dropped) = sorted(general)  # needs 3+ tags: the fixture gives them
    # The user's caption shares one tag with the model: it stays the user's even when a later run
    # no longer finds that tag.
    (data / "p.txt").write_text(f"my tag, {shared}", encoding="utf-8")
    tag_directory(data, tagger, first, run_opts(tmp_path))
    after_first = (data / "p.txt").read_text(encoding="utf-8").split(", ")
    assert {"sks", dropped} <= set(after_first)
    with open(data / "p.txt", "a", encoding="utf-8") as fh:  # a hand edit between the runs
        fh.write(", hand added")
    # Re-render from the cached scores with a new trigger, a higher threshold and one tag excluded.
    later = dataclasses.replace(first, trigger_tags=["ohwx"], general_threshold=(low + next_low) / 2,
                                exclude=[dropped], sort="alphabetical")
    no_model = Counting(tagger, fail_on_call=1, exc=AssertionError("the model ran despite the cache"))
    assert tag_directory(data, no_model, later, run_opts(tmp_path)).from_cache == 1
    text = (data / "p.txt").read_text(encoding="utf-8")
    # Exactly what one run with the later options gives on the user's own caption: none of the first
    # run's tags are left over ("sks", the excluded tag), the user's ("shared" too) all stay, in the
    # file's order (prepend had put "shared", being the model's too, ahead of "my tag").
    own = ["my tag", shared] if policy == "append" else [shared, "my tag"]
    assert text == render_caption(scores, tagger.labels, later, existing_text=", ".join(own + ["hand added"]))
    assert "sks" not in text.split(", ") and dropped not in text.split(", ") and shared in text.split(", ")
    assert sorted(p.name for p in data.iterdir()) == ["p.png", "p.txt"], "the record belongs in the cache folder"


def test_utf8_output_and_legacy_encoded_existing_caption(tmp_path, models):
    data = tmp_path / "data"
    data.mkdir()
    random_image(np.random.default_rng(1), 40, 40).save(data / "u.png")
    (data / "u.txt").write_bytes("café".encode("latin-1"))
    opts = dataclasses.replace(OPTS, existing_caption="append", trigger_tags=["猫耳"])
    tag_directory(data, models["free"], opts, run_opts(tmp_path))
    text = (data / "u.txt").read_bytes().decode("utf-8")
    assert text.startswith("猫耳, café, ")


def test_manifest_lists_tags_scores_and_skips(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    manifest = tmp_path / "out" / "manifest.jsonl"
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path, manifest=manifest))
    lines = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    records = {r["image"]: r for r in lines if "tags" in r}
    skipped = {Path(r["image"]).name: r["skipped"] for r in lines if "skipped" in r}
    assert sorted(records) == sorted(GOOD) and set(skipped) == set(BAD)
    for name, rec in records.items():
        assert ", ".join(rec["tags"]) == (data / Path(name).with_suffix(".txt")).read_text(encoding="utf-8")
        assert len(rec["ratings"]) == 4
        assert list(rec["scores"].values()) == sorted(rec["scores"].values(), reverse=True)
        assert min(rec["scores"].values()) >= 0.1


def test_ctrl_c_keeps_finished_captions_and_a_rerun_completes(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    interrupting = Counting(models["free"], fail_on_call=3, exc=KeyboardInterrupt())
    summary = tag_directory(data, interrupting, OPTS, run_opts(tmp_path, batch_size=2, cache=False))
    assert summary.interrupted and summary.inferred == 4
    partial = captions_of(data)
    assert len(partial) == 4 and all(text for text in partial.values())
    assert not list(data.glob(".*.tmp"))
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path, cache=False))
    clean = tmp_path / "clean"
    tag_directory(data, models["free"], OPTS, run_opts(tmp_path, cache=False, output_dir=clean))
    assert captions_of(data) == captions_of(clean)


def test_should_stop_finishes_what_is_decoded_then_stops(tmp_path, models):
    data = make_dataset(tmp_path / "data")
    polls = []

    def stop_after_five():
        polls.append(1)
        return len(polls) >= 5

    summary = tag_directory(data, models["free"], OPTS, run_opts(tmp_path, batch_size=3), should_stop=stop_after_five)
    assert summary.interrupted and summary.inferred == 5 and sorted(captions_of(data)) == \
        ["a_rgb.txt", "b_rgba.txt", "c.txt", "d_palette.txt", "e_la.txt"]


def test_bad_caption_options_fail_before_any_work(tmp_path, models):
    data = tmp_path / "data"
    data.mkdir()
    random_image(np.random.default_rng(4), 40, 40).save(data / "a.png")
    counting = Counting(models["free"])
    for bad in ({"exclude": ["/([/"]}, {"include": ["1girl", "/*hair/"]}, {"rating": "top"},
                {"general_threshold": 1.5}):
        with pytest.raises(AlchemyError):
            tag_directory(data, counting, dataclasses.replace(OPTS, **bad), run_opts(tmp_path))
    assert counting.calls == 0 and captions_of(data) == {}


def test_a_caption_that_fails_to_render_is_reported_not_dropped(tmp_path, models):
    class WrongWidth(Counting):  # one score short per image: rendering must fail for every image
        def predict(self, batch):
            return super().predict(batch)[:, :-1]

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(6)
    for name in ("a.png", "b.png", "c.jpg"):
        random_image(rng, 40, 30).save(data / name)
    summary = tag_directory(data, WrongWidth(models["free"]), OPTS, run_opts(tmp_path, cache=False))
    assert summary.written == 0 and captions_of(data) == {}
    assert sorted(Path(p).name for p, _ in summary.skipped) == ["a.png", "b.png", "c.jpg"]
    assert all(reason.startswith("caption not written (ValueError") for _, reason in summary.skipped)


def test_manifest_can_never_overwrite_an_image(tmp_path, models):
    data = tmp_path / "data"
    data.mkdir()
    random_image(np.random.default_rng(8), 40, 40).save(data / "a.png")
    before = file_hashes(data)
    for target in (data / "a.png", data / "new.webp", data):
        with pytest.raises(AlchemyError, match="manifest"):
            tag_directory(data, models["free"], OPTS, run_opts(tmp_path, manifest=target))
    assert file_hashes(data) == before and captions_of(data) == {}
