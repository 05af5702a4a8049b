"""Dataset rules: captions, filewords, templates, tag shuffle/dropout, sizes, alpha weights, bad files, hash."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.train.batches import TrainingData, plan_epoch, steps_per_epoch
from extensions_lib.train.dataset import (TEMPLATES_DIR, alpha_weight, caption_from_filename,
                                          compile_word_regex, create_text, load_template, scan_folder, target_size)
from extensions_lib.train.latent_cache import LatentCache
from train_fakes import FakeAdapter, make_folder, write_image


# ---- captions -----------------------------------------------------------------------------------------

def test_caption_from_txt_beside_the_image(tmp_path):
    write_image(tmp_path / "01-cat.png")
    (tmp_path / "01-cat.txt").write_text("\ufeff  a cat, sitting \n", encoding="utf-8")
    ds = scan_folder(tmp_path, width=64, height=64)
    assert ds.entries[0].caption == "a cat, sitting"


def test_caption_from_file_name_drops_leading_numbers(tmp_path):
    write_image(tmp_path / "00012-3 a cat on a mat.png")
    assert scan_folder(tmp_path, width=64, height=64).entries[0].caption == "a cat on a mat"


def test_filename_regex_and_join_string(tmp_path):
    write_image(tmp_path / "7-a cat (on) a_mat.png")
    ds = scan_folder(tmp_path, width=64, height=64, filename_word_regex=r"[a-z]+", filename_join_string="+")
    assert ds.entries[0].caption == "a+cat+on+a+mat"
    # one capture group: its text is kept, as re.findall does
    assert caption_from_filename("x-ray_cat", compile_word_regex(r"([a-z]+)_"), " ") == "ray"


@pytest.mark.parametrize("pattern, problem", [("[a-z", "not a valid regular expression"), ("(a)(b)", "capture groups")])
def test_bad_filename_regex_is_named(pattern, problem):
    with pytest.raises(AlchemyError, match="filename_word_regex") as info:
        compile_word_regex(pattern)
    assert problem in str(info.value)


def test_non_utf8_caption_skips_the_image_with_reason(tmp_path):
    make_folder(tmp_path, 2)
    (tmp_path / "img1.txt").write_bytes(b"\xff\xfe\xfa bad")
    ds = scan_folder(tmp_path, width=64, height=64)
    assert [e.path.name for e in ds.entries] == ["img0.png"]
    assert "UTF-8" in ds.skipped[0].reason and ds.skipped[0].path.name == "img1.png"


# ---- templates ----------------------------------------------------------------------------------------

def test_template_fills_name_and_filewords():
    rng = random.Random(0)
    assert create_text("a photo of [name], [filewords]", "red, round", "tok", rng) == "a photo of tok, red, round"


def test_template_without_name_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of [name]\n\n[filewords]\na [name] thing\n", encoding="utf-8")
    with pytest.raises(AlchemyError) as info:
        load_template(path, require_name=True)
    assert str(path) in str(info.value) and "line(s) 3 " in str(info.value)
    assert load_template(path, require_name=False).lines == ("a photo of [name]", "[filewords]", "a [name] thing")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_template_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(AlchemyError, match="no prompts"):
        load_template(path, require_name=False)


def test_missing_template_lists_shipped_ones(tmp_path):
    with pytest.raises(AlchemyError, match="subject_filewords") as info:
        load_template(tmp_path / "nope.txt", require_name=True)
    assert "nope.txt" in str(info.value)


@pytest.mark.parametrize("name", ["subject", "subject_filewords", "style", "style_filewords"])
def test_shipped_templates_name_every_line(name):
    t = load_template(name, require_name=True)
    assert t.path == TEMPLATES_DIR / f"{name}.txt" and len(t.lines) >= 5
    assert t.uses_filewords == name.endswith("filewords")
    assert all(("[filewords]" in line) == t.uses_filewords for line in t.lines)


def webui_create_text(line, caption, name, rng, shuffle_tags, tag_drop_out):
    """The WebUI's create_text as documented in reference 5.3, for comparison."""
    tags = caption.split(",")
    if tag_drop_out != 0:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


@pytest.mark.parametrize("shuffle, drop", [(False, 0.0), (True, 0.0), (False, 0.4), (True, 0.4)])
def test_shuffle_and_dropout_follow_the_webui_rule(shuffle, drop):
    caption = "a, b c, d,e , f, g, h"
    ours = [create_text("[name]: [filewords]", caption, "n", r, shuffle_tags=shuffle, tag_drop_out=drop)
            for r in [random.Random(5)] for _ in range(50)]
    theirs = [webui_create_text("[name]: [filewords]", caption, "n", r, shuffle, drop)
              for r in [random.Random(5)] for _ in range(50)]
    assert ours == theirs
    if not shuffle and not drop:
        assert set(ours) == {"n: " + caption}


def test_dropout_rate_and_shuffle_keep_the_tags():
    rng = random.Random(1)
    tags = [f"t{i}" for i in range(20)]
    kept = Counter()
    for _ in range(500):
        text = create_text("[filewords]", ",".join(tags), "", rng, shuffle_tags=True, tag_drop_out=0.25)
        out = text.split(",") if text else []
        assert len(set(out)) == len(out) and set(out) <= set(tags)
        kept.update(out)
    assert 0.70 < sum(kept.values()) / (500 * 20) < 0.80
    shuffled = create_text("[filewords]", ",".join(tags), "", random.Random(2), shuffle_tags=True)
    assert sorted(shuffled.split(",")) == sorted(tags) and shuffled.split(",") != tags


def test_prompts_deterministic_with_seed(tmp_path):
    make_folder(tmp_path, 3)
    ds = scan_folder(tmp_path, width=64, height=64)
    cache = LatentCache(ds, FakeAdapter())
    data = TrainingData(ds, cache, load_template("subject_filewords", require_name=True), name="tok",
                        shuffle_tags=True, tag_drop_out=0.3)

    def prompts(seed):
        rng = random.Random(seed)
        return [data.prompt(i % 3, rng) for i in range(30)]

    assert prompts(7) == prompts(7)
    assert prompts(7) != prompts(8)
    assert all("tok" in p for p in prompts(7))
    assert not data.prompts_are_static


# ---- sizes and batching -------------------------------------------------------------------------------

def test_fixed_size_resizes_everything(tmp_path):
    write_image(tmp_path / "a.png", size=(100, 37))
    ds = scan_folder(tmp_path, width=64, height=128)
    pixels, alpha = ds.load(0)
    assert ds.entries[0].size == (64, 128) and pixels.shape == (3, 128, 64) and alpha is None
    assert pixels.dtype == torch.float32 and -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0


@pytest.mark.parametrize("size, expected", [((100, 70), (128, 64)), ((90, 20), (64, 64)), ((96, 160), (128, 192)),
                                            ((200, 130), (192, 128)), ((64, 64), (64, 64))])
def test_variable_size_rounds_to_multiples_of_64(size, expected):
    assert target_size(size, 512, 512, varsize=True) == expected
    assert target_size(size, 512, 256, varsize=False) == (512, 256)


def test_pixels_are_webui_scaled(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    pixels, _ = scan_folder(tmp_path, width=64, height=64).load(0)
    assert torch.equal(pixels, torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1))


def test_variable_size_batches_never_mix_sizes(tmp_path):
    sizes = [(64, 64)] * 3 + [(128, 64)] * 4 + [(64, 192)]
    for i, s in enumerate(sizes):
        write_image(tmp_path / f"{i}.png", size=s, seed=i)
    ds = scan_folder(tmp_path, width=512, height=512, varsize=True)
    groups = ds.groups()
    assert sorted(len(g) for g in groups) == [1, 3, 4]
    for epoch in range(3):
        plan = plan_epoch(groups, 2, 1, seed=0, epoch=epoch)
        assert len(plan) == steps_per_epoch(groups, 2, 1) == 2 + 2 + 1
        seen = set()
        for (micro,) in plan:
            assert len({ds.entries[i].size for i in micro}) == 1 and len(micro) == 2
            seen.update(micro)
        assert seen == set(range(len(sizes)))  # every image every epoch


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    groups = [list(range(10)), list(range(10, 13))]
    assert plan_epoch(groups, 2, 2, 3, 1) == plan_epoch(groups, 2, 2, 3, 1)
    assert plan_epoch(groups, 2, 2, 3, 1) != plan_epoch(groups, 2, 2, 3, 2)
    assert plan_epoch(groups, 2, 2, 3, 1) != plan_epoch(groups, 2, 2, 4, 1)
    # accumulation sees the very images a bigger batch would, step for step
    big = [[i for m in step for i in m] for step in plan_epoch(groups, 4, 1, 3, 5)]
    acc = [[i for m in step for i in m] for step in plan_epoch(groups, 2, 2, 3, 5)]
    assert big == acc
    assert all(len(step) == 2 and all(len(m) == 2 for m in step) for step in plan_epoch(groups, 2, 2, 3, 5))


# ---- alpha as loss weight -----------------------------------------------------------------------------

def test_alpha_weight_half_opaque_image(tmp_path):
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:, :32] = 255
    write_image(tmp_path / "a.png", alpha=alpha)
    ds = scan_folder(tmp_path, width=64, height=64)
    _, a = ds.load(0)
    assert ds.entries[0].has_alpha
    w = alpha_weight(a, (8, 8), 4)
    assert w.shape == (4, 8, 8) and torch.equal(w[0], w[3])
    assert float(w.min()) == 0.0 and abs(float(w.mean()) - 1.0) < 1e-6
    # half the area opaque and the mean normalised to 1: opaque areas weigh 2, clear ones 0
    assert torch.allclose(w[:, :, :3], torch.full((4, 8, 3), 2.0), atol=0.05)
    assert torch.allclose(w[:, :, 5:], torch.zeros(4, 8, 3), atol=0.05)


def test_alpha_weight_non_square_keeps_orientation():
    alpha = np.zeros((64, 128), np.uint8)  # h=64, w=128
    alpha[:32, :] = 255                     # top half opaque
    w = alpha_weight(Image.fromarray(alpha, "L"), (8, 16), 4)
    assert w.shape == (4, 8, 16) and float(w[0, 0].mean()) > 1.9 and float(w[0, -1].mean()) < 0.1


def test_no_alpha_or_constant_alpha_gives_ones():
    assert torch.equal(alpha_weight(None, (8, 8), 4), torch.ones(4, 8, 8))
    flat = Image.fromarray(np.full((64, 64), 128, np.uint8), "L")
    assert torch.equal(alpha_weight(flat, (8, 8), 4), torch.ones(4, 8, 8))


def test_palette_transparency_becomes_alpha(tmp_path):
    img = Image.new("P", (64, 64), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 32, 64))
    img.save(tmp_path / "p.png", transparency=0)
    ds = scan_folder(tmp_path, width=64, height=64)
    _, alpha = ds.load(0)
    assert ds.entries[0].has_alpha and np.asarray(alpha)[0, 0] == 0 and np.asarray(alpha)[0, 63] == 255


# ---- odd and bad files --------------------------------------------------------------------------------

def test_bad_files_are_skipped_with_reasons(tmp_path):
    make_folder(tmp_path, 2)
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.webp").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "notes.json").write_text("{}")
    ds = scan_folder(tmp_path, width=64, height=64)
    assert [e.path.name for e in ds.entries] == ["img0.png", "img1.png"]
    reasons = {s.path.name: s.reason for s in ds.skipped}
    assert set(reasons) == {"truncated.png", "empty.jpg", "noise.webp"}
    assert "empty file" in reasons["empty.jpg"] and all("cannot be read" in r for r in reasons.values())


def test_empty_or_missing_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "only.txt").write_text("caption")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AlchemyError) as info:
        scan_folder(tmp_path, width=64, height=64)
    assert str(tmp_path) in str(info.value) and "bad.png" in str(info.value)
    with pytest.raises(AlchemyError, match="not found") as info:
        scan_folder(tmp_path / "missing")
    assert "missing" in str(info.value)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((64, 128, 3), np.uint8))  # 128 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    img.save(tmp_path / "r.jpg", exif=exif)
    assert scan_folder(tmp_path, varsize=True).entries[0].size == (64, 128)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((64, 64), 32896, np.uint16)  # 0x8080: half-bright
    arr[:, :32] = 65535
    Image.fromarray(arr, "I;16").save(tmp_path / "deep.png")
    pixels, _ = scan_folder(tmp_path, width=64, height=64).load(0)
    assert float(pixels[0, 0, 0]) == 1.0 and float(pixels[0, 0, 63]) == pytest.approx(128 / 127.5 - 1, abs=1e-6)


# ---- content hash -------------------------------------------------------------------------------------

def test_content_hash_tracks_images_and_captions(tmp_path):
    make_folder(tmp_path, 3)
    h = scan_folder(tmp_path, width=64, height=64).content_hash
    assert scan_folder(tmp_path, width=64, height=64).content_hash == h
    (tmp_path / "unrelated.csv").write_text("x")
    assert scan_folder(tmp_path, width=64, height=64).content_hash == h
    (tmp_path / "img1.txt").write_text("another caption")
    h2 = scan_folder(tmp_path, width=64, height=64).content_hash
    assert h2 != h
    write_image(tmp_path / "img2.png", seed=99)
    assert scan_folder(tmp_path, width=64, height=64).content_hash not in (h, h2)
