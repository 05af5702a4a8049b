"""`alchemy preprocess` end to end: names, sizes, captions, flips, modes, bad inputs, resume, CLI."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extensions_lib.errors import AlchemyError, Cancelled
from extensions_lib.options import from_dict, to_dict
from extensions_lib.preprocess import cli
from extensions_lib.preprocess.options import CaptionAction, Objective, PreprocessOptions
from extensions_lib.preprocess.run import preprocess_directory


def opts(**kw) -> PreprocessOptions:
    return dataclasses.replace(PreprocessOptions(width=64, height=64), **kw)


def save_random(path: Path, w: int, h: int, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    save_random(d / "wide.png", 120, 80, 1)
    save_random(d / "tall.png", 80, 160, 2)
    save_random(d / "square.bmp", 50, 50, 3)
    (d / "tall.txt").write_text("my trigger, long hair", encoding="utf-8")
    return d


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def host_caption(image: Path) -> str:
    """The WebUI dataset loader's rule (a1111-host.md 5.3): the .txt, else the stem minus `^[-\\d]+\\s*`."""
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8") if txt.exists() else re.sub(r"^[-\d]+\s*", "", image.stem)


def brightness_captioner(images):
    """A deterministic stand-in for a tagger: one tag per image from its content."""
    return [f"mean {int(np.asarray(im).mean())}, {'wide' if im.width > im.height else 'not wide'}"
            for im in images]


def test_default_names_sizes_and_pixels(src, tmp_path):
    dst = tmp_path / "out"
    summary = preprocess_directory(src, dst, opts())
    # Sorted sources: square.bmp, tall.png, wide.png; no caption action, no tagger: no .txt files.
    assert listing(dst) == ["00000-0-square.png", "00001-0-tall.png", "00002-0-wide.png"]
    for name in listing(dst):
        assert Image.open(dst / name).size == (64, 64)
        assert Image.open(dst / name).mode == "RGB"
    # Independent: the WebUI's crop-and-resize of wide.png (120x80 -> 96x64 -> centre 64).
    wide = Image.open(src / "wide.png").resize((96, 64), resample=Image.LANCZOS).crop((16, 0, 80, 64))
    assert np.array_equal(np.asarray(Image.open(dst / "00002-0-wide.png")), np.asarray(wide))
    assert [host_caption(dst / n) for n in listing(dst)] == ["square", "tall", "wide"]
    assert summary.processed == summary.sources == 3 and summary.images_written == 3
    assert summary.captions_written == 0 and summary.skipped == []


@pytest.mark.parametrize("action,with_tagger,expected", [
    (CaptionAction.IGNORE, False, None),
    (CaptionAction.COPY, False, "my trigger, long hair"),
    (CaptionAction.PREPEND, False, "my trigger, long hair"),
    (CaptionAction.IGNORE, True, "{new}"),
    (CaptionAction.COPY, True, "my trigger, long hair"),
    (CaptionAction.PREPEND, True, "my trigger, long hair, {new}"),
    (CaptionAction.APPEND, True, "{new}, my trigger, long hair"),
])
def test_existing_caption_actions(src, tmp_path, action, with_tagger, expected):
    dst = tmp_path / "out"
    preprocess_directory(src, dst, opts(existing_caption=action),
                         captioner=brightness_captioner if with_tagger else None)
    out = dst / "00001-0-tall.png"
    new = brightness_captioner([Image.open(out)])[0]
    txt = dst / "00001-0-tall.txt"
    if expected is None:
        assert not txt.exists()
    else:
        assert txt.read_text(encoding="utf-8") == expected.format(new=new)
        assert host_caption(out) == expected.format(new=new)
    # Sources without a .txt get only the tagger's caption (or nothing).
    other = dst / "00002-0-wide.txt"
    if with_tagger:
        assert other.read_text(encoding="utf-8") == brightness_captioner([Image.open(dst / "00002-0-wide.png")])[0]
    else:
        assert not other.exists()


def test_merge_drops_repeated_tags_and_keeps_utf8(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    save_random(s / "x.png", 64, 64)
    (s / "x.txt").write_text("\ufeffcafé ☕, Long_Hair", encoding="utf-8")  # BOM from a Windows editor
    preprocess_directory(s, tmp_path / "o", opts(existing_caption=CaptionAction.PREPEND),
                         captioner=lambda ims: ["long hair, solo"] * len(ims))
    assert (tmp_path / "o" / "00000-0-x.txt").read_bytes().decode("utf-8") == "café ☕, Long_Hair, solo"


def test_flipped_copies_are_mirror_images(src, tmp_path):
    dst = tmp_path / "out"
    preprocess_directory(src, dst, opts(flip=True))
    assert listing(dst) == ["00000-0-square.png", "00000-1-square.png", "00001-0-tall.png", "00001-1-tall.png",
                            "00002-0-wide.png", "00002-1-wide.png"]
    for stem in ("00000-{}-square", "00001-{}-tall", "00002-{}-wide"):
        a = np.asarray(Image.open(dst / f"{stem.format(0)}.png"))
        b = np.asarray(Image.open(dst / f"{stem.format(1)}.png"))
        assert np.array_equal(b, a[:, ::-1]) and not np.array_equal(a, b)


def test_split_tiles_with_flips_in_order(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    arr = save_random(s / "strip.png", 50, 200)  # -> 64 x 256: ceil((256 - 12.8) / 51.2) = 5 tiles
    dst = tmp_path / "o"
    summary = preprocess_directory(s, dst, opts(split=True, flip=True))
    assert listing(dst) == [f"00000-{i}-strip.png" for i in range(10)]
    scaled = np.asarray(Image.fromarray(arr).resize((64, 256), resample=Image.BICUBIC))
    for tile, y in enumerate([0, 48, 96, 144, 192]):
        assert np.array_equal(np.asarray(Image.open(dst / f"00000-{2 * tile}-strip.png")), scaled[y:y + 64])
        assert np.array_equal(np.asarray(Image.open(dst / f"00000-{2 * tile + 1}-strip.png")),
                              scaled[y:y + 64, ::-1])
    assert summary.images_written == 10


def test_split_below_threshold_falls_back_to_crop_and_resize(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    save_random(s / "mild.png", 100, 150)  # ratio 0.67 > 0.5: not split
    preprocess_directory(s, tmp_path / "o", opts(split=True))
    assert listing(tmp_path / "o") == ["00000-0-mild.png"]


def test_modes_are_cumulative_in_webui_order(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    save_random(s / "pic.png", 400, 100)
    o = opts(width=64, height=64, split=True, focal_crop=True, autosize=True, keep_original_size=True,
             autosize_min_dim=64, autosize_max_dim=256, autosize_max_area=256 * 64, autosize_threshold=0.01)
    summary = preprocess_directory(s, tmp_path / "o", o)
    sizes = [Image.open(tmp_path / "o" / n).size for n in listing(tmp_path / "o")]
    # split: 256x64 -> ceil((256-12.8)/51.2) = 5 tiles; focal: 64x64; auto-size: 256x64 (4:1); original.
    assert sizes == [(64, 64)] * 5 + [(64, 64), (256, 64), (400, 100)]
    assert summary.images_written == 8


def test_focal_debug_image_goes_beside_not_into_the_dataset(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    save_random(s / "pic.png", 128, 64)
    summary = preprocess_directory(s, tmp_path / "o", opts(focal_crop=True, focal_debug=True))
    assert listing(tmp_path / "o") == ["00000-0-pic.png"]
    assert Image.open(tmp_path / "o" / "focal-debug" / "00000-0-pic.png").size == (128, 64)
    assert any("face detection unavailable" in n for n in summary.notes)


def test_autosize_without_a_fit_is_skipped_with_a_reason(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    save_random(s / "thin.png", 300, 20)
    summary = preprocess_directory(s, tmp_path / "o", opts(autosize=True, autosize_objective=Objective.MINIMIZE_ERROR))
    assert listing(tmp_path / "o") == []
    assert summary.skipped and summary.skipped[0][0] == "thin.png" and "error threshold" in summary.skipped[0][1]


def test_bad_inputs_are_skipped_with_reasons(src, tmp_path):
    good = (src / "wide.png").read_bytes()
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes(good[: len(good) // 3])
    (src / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (src / "notes.md").write_text("not an image")
    before = digest(src)
    dst = tmp_path / "out"
    summary = preprocess_directory(src, dst, opts())
    reasons = dict(summary.skipped)
    assert set(reasons) == {"empty.png", "truncated.png", "garbage.jpg"}
    assert "empty" in reasons["empty.png"]
    assert all(reasons.values())
    assert summary.processed == 3 and summary.sources == 6
    assert any("1 non-image file" in n for n in summary.notes)
    # Good images keep their numbers (index = position among the sorted image files).
    assert listing(dst) == ["00002-0-square.png", "00003-0-tall.png", "00005-0-wide.png"]
    assert digest(src) == before
    assert "garbage.jpg" in "\n".join(summary.lines())


def test_inputs_are_never_overwritten(src, tmp_path):
    before = digest(src)
    with pytest.raises(AlchemyError, match="same folder"):
        preprocess_directory(src, src, opts())
    with pytest.raises(AlchemyError, match="same folder"):
        preprocess_directory(src, src / ".." / "src", opts())
    with pytest.raises(AlchemyError, match="source folder not found"):
        preprocess_directory(tmp_path / "missing", tmp_path / "o", opts())
    assert digest(src) == before

    # An output name in dst that links to a source file is refused, and the source keeps its bytes.
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "00001-0-tall.png").symlink_to(src / "tall.png")
    with pytest.raises(AlchemyError, match="overwrite a source"):
        preprocess_directory(src, dst, opts())
    assert digest(src) == before


def test_destination_inside_source_is_not_read_back(src, tmp_path):
    (src / "sub").mkdir()
    save_random(src / "sub" / "nested.png", 64, 64)
    dst = src / "prepared"
    first = preprocess_directory(src, dst, opts(recursive=True))
    assert first.sources == 4
    assert "00001-0-nested.png" in listing(dst)  # numbered by relative path: sub/nested.png
    second = preprocess_directory(src, dst, opts(recursive=True))
    assert second.sources == 4 and second.resumed == 4  # its own outputs were not picked up as sources


def test_resume_skips_done_sources_and_redoes_changed_ones(src, tmp_path):
    dst = tmp_path / "out"
    preprocess_directory(src, dst, opts(flip=True))
    stamps = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    again = preprocess_directory(src, dst, opts(flip=True))
    assert again.resumed == 3 and again.processed == 0
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == stamps

    (dst / "00001-1-tall.png").unlink()                      # a missing output: that source is redone
    third = preprocess_directory(src, dst, opts(flip=True))
    assert third.resumed == 2 and third.processed == 1 and (dst / "00001-1-tall.png").exists()

    fourth = preprocess_directory(src, dst, opts(flip=True, width=72))  # other options: all redone
    assert fourth.processed == 3 and any("options changed" in n for n in fourth.notes)
    assert Image.open(dst / "00000-0-square.png").size == (72, 64)


def test_interrupted_run_resumes(src, tmp_path):
    dst = tmp_path / "out"
    seen = []

    def stop_after_two():
        return len(seen) >= 2

    with pytest.raises(Cancelled):
        preprocess_directory(src, dst, opts(), progress=lambda i, n, p: seen.append(p.name), should_stop=stop_after_two)
    assert listing(dst) == ["00000-0-square.png", "00001-0-tall.png"]
    rest = preprocess_directory(src, dst, opts())
    assert rest.resumed == 2 and rest.processed == 1
    assert not [p for p in dst.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_stale_caption_removed_when_a_rerun_writes_none(src, tmp_path):
    dst = tmp_path / "out"
    preprocess_directory(src, dst, opts(), captioner=brightness_captioner, caption_id="m1")
    assert (dst / "00000-0-square.txt").exists()
    preprocess_directory(src, dst, opts())
    assert not [n for n in listing(dst) if n.endswith(".txt")]


def test_options_round_trip_and_validation():
    o = opts(existing_caption=CaptionAction.APPEND, autosize_objective=Objective.MINIMIZE_ERROR, split=True)
    assert from_dict(PreprocessOptions, to_dict(o)) == o
    with pytest.raises(AlchemyError, match="autosize_min_dim"):
        preprocess_directory(".", "/nonexistent-dst", opts(autosize_min_dim=800, autosize_max_dim=512))
    with pytest.raises(AlchemyError, match="expects CaptionAction"):
        from_dict(PreprocessOptions, {"existing_caption": "keep"})


def test_cli_command(src, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="alchemy")
    cli.register(parser.add_subparsers(dest="command"))
    dst = tmp_path / "out"
    args = parser.parse_args(["preprocess", str(src), str(dst), "--width", "96", "--height", "64", "--flip",
                              "--existing-caption", "copy"])
    assert args.func(args) == 0
    assert Image.open(dst / "00002-1-wide.png").size == (96, 64)
    assert (dst / "00001-0-tall.txt").read_text(encoding="utf-8") == "my trigger, long hair"
    assert "3 of 3 source images processed: 6 images and 2 captions written" in capsys.readouterr().out


def test_odd_image_modes_are_processed_and_transparency_kept(tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    rgba = np.zeros((64, 128, 4), np.uint8)
    rgba[:, 64:] = (255, 0, 0, 255)                       # right half opaque red, left half transparent
    Image.fromarray(rgba, "RGBA").save(s / "a_alpha.png")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16, "I;16").save(s / "b_16bit.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(s / "c_cmyk.jpg")
    frames = [Image.new("P", (64, 64), i) for i in (3, 9)]
    frames[0].save(s / "d_anim.gif", save_all=True, append_images=frames[1:])
    summary = preprocess_directory(s, tmp_path / "o", opts(focal_crop=True, flip=True))
    assert summary.skipped == [] and summary.processed == 4
    out = Image.open(tmp_path / "o" / "00000-0-a_alpha.png")
    # The WebUI's trainers read alpha as a loss weight (use_weight) and drop it otherwise.
    assert out.mode == "RGBA" and out.size == (64, 64)
    alpha = np.asarray(out)[..., 3]
    flipped_alpha = np.asarray(Image.open(tmp_path / "o" / "00000-1-a_alpha.png"))[..., 3]
    assert np.array_equal(flipped_alpha, alpha[:, ::-1])
    assert alpha.min() == 0 and alpha.max() == 255
    sixteen = np.asarray(Image.open(tmp_path / "o" / "00001-0-b_16bit.png"))
    assert sixteen.max() > 200 and sixteen.min() < 10      # scaled from 16 bits, not clipped to white
    assert Image.open(tmp_path / "o" / "00002-0-c_cmyk.png").mode == "RGB"


@pytest.mark.needs_gradio
def test_options_render_as_a_gradio_tab():
    gr = pytest.importorskip("gradio")
    from extensions_lib.options import from_ui_values, gradio_components

    with gr.Blocks():
        comps = gradio_components(PreprocessOptions)
    assert isinstance(comps["width"], gr.Slider) and (comps["width"].minimum, comps["width"].maximum) == (64, 2048)
    assert isinstance(comps["flip"], gr.Checkbox) and isinstance(comps["autosize_min_area"], gr.Number)
    assert isinstance(comps["existing_caption"], gr.Dropdown)
    names = list(comps)
    values = [comps[n].value for n in names]
    assert from_ui_values(PreprocessOptions, names, values) == PreprocessOptions()


def test_registered_in_the_alchemy_cli(src, tmp_path, capsys):
    pytest.importorskip("extensions_lib.commands.dataset")
    from extensions_lib.cli import main

    assert main(["preprocess", str(src), str(tmp_path / "o"), "--width", "64", "--height", "64"]) == 0
    assert listing(tmp_path / "o") == ["00000-0-square.png", "00001-0-tall.png", "00002-0-wide.png"]
    assert main(["preprocess", str(src), str(src)]) == 1
    assert "same folder" in capsys.readouterr().err


def test_focal_crop_applies_whenever_the_aspect_differs(tmp_path):
    from extensions_lib.preprocess.run import derive_images

    arr = np.full((128, 128, 3), 128, np.uint8)
    arr[4:36, 40:72] = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # object near the top
    img = Image.fromarray(arr)
    out = derive_images(img, opts(width=128, height=64, focal_crop=True)).images
    assert len(out) == 1 and out[0].size == (128, 64)
    ys, xs = np.nonzero((np.asarray(out[0]) != 128).any(axis=2))
    assert ys.max() - ys.min() + 1 == 32 and xs.max() - xs.min() + 1 == 32   # whole object kept
    centre = derive_images(img, opts(width=128, height=64)).images[0]       # the plain centre crop cuts it
    assert ((np.asarray(centre) != 128).any(axis=2)).sum() < 32 * 32


def test_out_of_range_options_built_in_code_are_rejected(tmp_path, src):
    with pytest.raises(AlchemyError, match="width"):
        preprocess_directory(src, tmp_path / "o", opts(width=32))
    assert not (tmp_path / "o").exists()
