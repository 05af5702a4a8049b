"""Tag editor core: loading, filters, counts, batch edits with preview, atomic save, undo/redo, snapshots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.tag_editor import Edit, TagEditor, TagFilter, apply_edit, sort_tags, split_tags
from extensions_lib.tag_editor.thumbs import thumbnail

CAPTIONS = {
    "a.png": "1girl, long hair, smile",
    "b.png": "1girl, short hair",
    "c.png": "1boy, smile, hat",
    "d.png": None,             # no caption yet
}


def make_dataset(root: Path, captions=CAPTIONS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(captions.items()):
        Image.new("RGB", (8 + i, 8), (i * 40, 0, 0)).save(root / name)
        if text is not None:
            (root / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    return root


def caption(root: Path, name: str) -> str:
    return (root / name).with_suffix(".txt").read_text(encoding="utf-8")


def test_split_and_sidecar_lookup(tmp_path):
    assert split_tags(" a ,b,, c\n d ") == ["a", "b", "c", "d"]
    root = make_dataset(tmp_path / "ds", {"x.png": None})
    (root / "x.png.txt").write_text("from gallery-dl", encoding="utf-8")
    ed = TagEditor(root)
    assert ed.entry("x.png").text == "from gallery-dl"
    assert ed.entry("x.png").caption_path.name == "x.png.txt"


def test_filters_and_or():
    tags = ["1girl", "smile"]
    assert TagFilter(include=("1girl", "smile")).matches(tags)
    assert not TagFilter(include=("1girl", "hat")).matches(tags)
    assert TagFilter(include=("1girl", "hat"), include_mode="or").matches(tags)
    assert not TagFilter(exclude=("hat", "smile")).matches(tags)               # OR: any excluded tag rejects
    assert TagFilter(exclude=("hat", "smile"), exclude_mode="and").matches(tags)  # AND: only all of them
    assert not TagFilter(exclude=("1girl", "smile"), exclude_mode="and").matches(tags)


def test_counts_and_sorts(tmp_path):
    ed = TagEditor(make_dataset(tmp_path / "ds"))
    counts = ed.counts()
    assert counts == {"1girl": 2, "smile": 2, "long hair": 1, "short hair": 1, "1boy": 1, "hat": 1}
    assert [t for t, _ in sort_tags(counts, "frequency")][:2] == ["1girl", "smile"]
    assert [t for t, _ in sort_tags(counts, "name")] == sorted(counts)
    assert [t for t, _ in sort_tags(counts, "name", descending=True)] == sorted(counts, reverse=True)
    by_len = sort_tags(counts, "tokens", token_count=len)  # any counter: longest first, ties by name
    assert [t for t, _ in by_len] == sorted(counts, key=lambda t: (-len(t), t))


def test_token_length_uses_clip_bpe():
    from extensions_lib.backend.tokenizer import make_tokenizer
    from extensions_lib.tag_editor.stats import clip_token_counter

    count = clip_token_counter()
    tok = make_tokenizer("open_clip")
    for tag in ("1girl", "looking at viewer", "hatsune miku"):
        assert count(tag) == len(tok.tokenize([tag])[0])
    order = sort_tags({"hat": 1, "looking at viewer": 1}, "tokens")
    assert order[0][0] == "looking at viewer"


def test_apply_edit_semantics():
    assert apply_edit(Edit("add", tags=("b", "x")), "a, b") == "a, b, x"
    assert apply_edit(Edit("add", tags=("x",), position="prepend"), "a, b") == "x, a, b"
    assert apply_edit(Edit("remove", tags=("a",)), "a, b") == "b"
    # literal replace matches whole tags only
    assert apply_edit(Edit("replace", find="girl", replacement="boy"), "1girl, girl") == "1girl, boy"
    # regex inside each tag, commas split, duplicates and empties dropped
    assert apply_edit(Edit("replace", find=r"(\w+) hair", replacement=r"\1, hair", regex=True),
                      "long hair, hair, smile") == "long, hair, smile"
    assert apply_edit(Edit("replace", find="^smile$", replacement="", regex=True), "a, smile") == "a"
    assert apply_edit(Edit("replace", find="a,", replacement="", scope="caption"), "a, b") == " b"
    # an edit that changes no tag leaves the text byte for byte (no re-spacing of untouched files)
    assert apply_edit(Edit("remove", tags=("zzz",)), "a ,b") == "a ,b"
    with pytest.raises(AlchemyError, match="bad regular expression"):
        Edit("replace", find="(", regex=True)


def test_batch_edit_on_filtered_set_preview_then_apply(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    keys = ed.select(TagFilter(include=("smile",)))
    assert keys == ["a.png", "c.png"]
    edit = Edit("replace", find="smile", replacement="grin")
    preview = ed.preview(edit, keys)
    assert [(c.key, c.after) for c in preview] == [("a.png", "1girl, long hair, grin"), ("c.png", "1boy, grin, hat")]
    assert caption(root, "a.png") == CAPTIONS["a.png"]  # a preview writes nothing
    result = ed.apply(edit, keys)
    assert len(result.changed) == 2 and not result.skipped
    assert caption(root, "a.png") == "1girl, long hair, grin"
    assert caption(root, "b.png") == CAPTIONS["b.png"]
    assert TagEditor(root).counts()["grin"] == 2


def test_add_creates_missing_caption_and_one_image_edit(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    ed.apply(Edit("add", tags=("solo",)), ["d.png"])
    assert caption(root, "d.png") == "solo"
    ed.set_caption("b.png", "  1girl, bob cut ")
    assert caption(root, "b.png") == "1girl, bob cut"
    with pytest.raises(AlchemyError, match="no image"):
        ed.set_caption("../outside.png", "x")


def test_never_empties_a_caption_by_accident(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    result = ed.apply(Edit("remove", tags=("1girl", "short hair")), ["a.png", "b.png"])
    assert [c.key for c in result.changed] == ["a.png"]
    assert result.skipped[0][0] == "b.png" and "empty" in result.skipped[0][1]
    assert caption(root, "b.png") == CAPTIONS["b.png"]
    result = ed.apply(Edit("remove", tags=("1girl", "short hair")), ["b.png"], allow_empty=True)
    assert caption(root, "b.png") == ""


def test_undo_redo_and_journal_survives_a_new_session(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    ed.apply(Edit("add", tags=("masterpiece",), position="prepend"), list(ed.entries))
    ed.apply(Edit("remove", tags=("smile",)), list(ed.entries))
    assert caption(root, "a.png") == "masterpiece, 1girl, long hair"
    ed.undo()
    assert caption(root, "a.png") == "masterpiece, 1girl, long hair, smile"
    other = TagEditor(root)  # e.g. `alchemy tags undo` after a tab edit
    other.undo()
    assert {n: caption(root, n) for n in ("a.png", "b.png", "c.png")} == {n: CAPTIONS[n] for n in ("a.png", "b.png", "c.png")}
    assert caption(root, "d.png") == ""  # created by the add; undone to an empty caption
    assert other.undo() is None
    other.redo()
    assert caption(root, "c.png") == "masterpiece, 1boy, smile, hat"
    labels, position = other.history()
    assert position == 1 and len(labels) == 2
    other.apply(Edit("add", tags=("x",)), ["a.png"])  # a new edit drops the redo branch
    assert other.history()[1] == 2 and len(other.history()[0]) == 2
    assert other.redo() is None


def test_undo_of_a_caption_edited_elsewhere_is_refused_and_kept(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    ed.apply(Edit("add", tags=("x",)), ["a.png"])
    (root / "a.txt").write_text("hand edit", encoding="utf-8")
    result = ed.undo()
    assert not result.changed and "changed on disk" in result.skipped[0][1]
    assert caption(root, "a.png") == "hand edit" and ed.history()[1] == 1  # still undoable after a reload
    (root / "a.txt").write_text(CAPTIONS["a.png"] + ", x", encoding="utf-8")
    ed.reload()
    assert ed.undo().changed and caption(root, "a.png") == CAPTIONS["a.png"]


def test_external_change_is_not_overwritten(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    (root / "a.txt").write_text("edited elsewhere", encoding="utf-8")
    result = ed.apply(Edit("add", tags=("x",)), ["a.png", "b.png"])
    assert [c.key for c in result.changed] == ["b.png"]
    assert "changed on disk" in result.skipped[0][1]
    assert caption(root, "a.png") == "edited elsewhere"
    assert ed.entry("a.png").text == "edited elsewhere"  # reloaded for the next edit


def test_snapshot_holds_the_files_before_each_batch(tmp_path):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root, keep_snapshots=2)
    first = ed.apply(Edit("add", tags=("x",)), ["a.png", "d.png"]).snapshot
    assert (first / "a.txt").read_text(encoding="utf-8") == CAPTIONS["a.png"]
    manifest = json.loads((first / "snapshot.json").read_text())
    assert {f["image"]: f["existed"] for f in manifest["files"]} == {"a.png": True, "d.png": False}
    ed.apply(Edit("add", tags=("y",)), ["a.png"])
    ed.apply(Edit("add", tags=("z",)), ["a.png"])
    assert len(list((root / ".alchemy-tags" / "snapshots").iterdir())) == 2  # oldest pruned
    assert "a.png" in TagEditor(root).entries and len(TagEditor(root).entries) == 4  # state folder not listed


def test_save_is_atomic(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    import extensions_lib.atomic as atomic

    real_replace = atomic.os.replace

    def crash(src, dst):
        if Path(dst).parent == root:  # the caption itself; the snapshot and journal still save
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash)
    result = ed.apply(Edit("add", tags=("x",)), ["a.png"])
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not result.changed and "disk full" in result.skipped[0][1]
    assert caption(root, "a.png") == CAPTIONS["a.png"]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    assert ed.history()[0] == []  # nothing recorded for a batch that wrote nothing


def test_no_edit_without_its_snapshot(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds")
    ed = TagEditor(root)
    import extensions_lib.tag_editor.session as session

    def fail(*args, **kwargs):
        raise OSError("read-only")

    monkeypatch.setattr(session.shutil, "copy2", fail)
    with pytest.raises(AlchemyError, match="snapshot"):
        ed.apply(Edit("add", tags=("x",)), ["a.png"])
    assert caption(root, "a.png") == CAPTIONS["a.png"]


def test_unreadable_caption_is_skipped_not_rewritten(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    ed = TagEditor(root)
    assert "b.png" not in ed.entries and "UTF-8" in ed.skipped[0][1]


def test_thumbnail_cache(tmp_path):
    root = make_dataset(tmp_path / "ds")
    big = root / "big.png"
    Image.new("RGB", (1000, 500), (1, 2, 3)).save(big)
    first = thumbnail(big, tmp_path / "cache", size=64)
    assert Image.open(first).size == (64, 32)
    stamp = first.stat().st_mtime_ns
    assert thumbnail(big, tmp_path / "cache", size=64) == first and first.stat().st_mtime_ns == stamp
    Image.new("RGB", (100, 100)).save(big)
    import os
    os.utime(big, ns=(stamp + 10**9, stamp + 10**9))
    assert thumbnail(big, tmp_path / "cache", size=64) != first
    (root / "broken.png").write_bytes(b"not an image")
    assert thumbnail(root / "broken.png", tmp_path / "cache") is None
