"""``alchemy aesthetic create`` and ``alchemy txt2img --aesthetic`` end to end on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extensions_lib.cli import main
from extensions_lib.sampling.infotext import quote
from tests.aesthetic_fakes import make_hf_clip, make_images, make_open_clip


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_create_then_generate(tmp_path, tiny_checkpoint, capsys, family):
    clip_dir = tmp_path / "clip"
    if family == "sd1":
        make_hf_clip(clip_dir / "clip-vit-large-patch14")
    else:
        make_open_clip(clip_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    images = make_images(tmp_path / "style", count=4)
    emb_dir = tmp_path / "aesthetic"
    create = ["aesthetic", "create", "--name", "mystyle", "--source", str(images), "--family", family,
              "--aesthetic-dir", str(emb_dir), "--clip-dir", str(clip_dir), "--device", "cpu", "--batch-size", "3"]
    assert main(create) == 0
    assert (emb_dir / "mystyle.pt").is_file()
    assert main(create) == 1 and "exists" in capsys.readouterr().err      # no silent overwrite
    assert main(["aesthetic", "list", "--aesthetic-dir", str(emb_dir)]) == 0
    assert capsys.readouterr().out.startswith("mystyle\t")

    base = ["txt2img", "--ckpt", str(tiny_checkpoint(family)), "--device", "cpu", "--prompt", "a red square",
            "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--aesthetic-dir", str(emb_dir),
            "--aesthetic-clip", str(clip_dir / "clip-vit-large-patch14")]
    assert main(base + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["--out", str(tmp_path / "zero.png"), "--aesthetic", "mystyle:0"]) == 0
    assert main(base + ["--out", str(tmp_path / "on.png"), "--aesthetic", "mystyle:0.9", "--aesthetic-steps", "3",
                        "--aesthetic-lr", "0.01"]) == 0
    assert np.array_equal(_pixels(tmp_path / "zero.png"), _pixels(tmp_path / "plain.png"))
    assert not np.array_equal(_pixels(tmp_path / "on.png"), _pixels(tmp_path / "plain.png"))
    info = Image.open(tmp_path / "on.png").info["parameters"]
    for key, value in {"Aesthetic LR": "0.01", "Aesthetic weight": "0.9", "Aesthetic steps": "3",
                       "Aesthetic embedding": "mystyle", "Aesthetic slerp": "False"}.items():
        assert f"{key}: {quote(value)}" in info
    assert "Aesthetic" not in Image.open(tmp_path / "zero.png").info["parameters"]


def test_sd1_without_clip_says_how_to_get_it(tmp_path, tiny_checkpoint, capsys):
    emb_dir = tmp_path / "aesthetic"
    emb_dir.mkdir()
    import torch

    from extensions_lib.aesthetic.file import save_aesthetic

    save_aesthetic(torch.randn(768), emb_dir / "laion.pt")
    args = ["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--device", "cpu", "--prompt", "x", "--steps", "1",
            "--width", "64", "--height", "64", "--aesthetic", "laion", "--aesthetic-dir", str(emb_dir),
            "--aesthetic-clip", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]
    assert main(args) == 1
    assert "--download" in capsys.readouterr().err
