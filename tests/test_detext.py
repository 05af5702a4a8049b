"""Text removal: the real PP-OCRv4 detector from the rapidocr-onnxruntime wheel on synthetic text, the mask and
inpainting (only masked pixels change), and `alchemy detext` (originals never written)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from extensions_lib.errors import AlchemyError

pytest.importorskip("cv2")
BACKGROUND = (200, 220, 240)


def text_image(lines=("HELLO WORLD", "sample 2024")) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A 640x480 picture with big blocky text, and the text's bounding boxes."""
    small = Image.new("RGB", (160, 60), BACKGROUND)
    draw = ImageDraw.Draw(small)
    boxes = []
    for i, line in enumerate(lines):
        draw.text((10, 10 + 25 * i), line, fill=(20, 20, 20))
        x1, y1, x2, y2 = draw.textbbox((10, 10 + 25 * i), line)
        boxes.append((x1 * 4, y1 * 4 + 120, x2 * 4, y2 * 4 + 120))
    out = Image.new("RGB", (640, 480), BACKGROUND)
    out.paste(small.resize((640, 240), Image.NEAREST), (0, 120))
    return out, boxes


@pytest.fixture(scope="module")
def detector():
    from extensions_lib.detext.detector import DbTextDetector, find_model

    try:
        path = find_model()
    except AlchemyError:
        pytest.skip("rapidocr-onnxruntime (which ships the PP-OCR detector) is not installed")
    return DbTextDetector(path, device="cpu")


def test_input_size_follows_rapidocr():
    from extensions_lib.detext.detector import input_size

    assert input_size(640, 480) == (992, 736)       # short side up to 736, multiples of 32
    assert input_size(1000, 800) == (992, 800)      # already long enough: rounded to the nearest 32
    assert input_size(4000, 3000) == (1984, 1504)   # long side capped at 2000


def test_real_ppocr_finds_the_text_and_nothing_else(detector):
    image, truth = text_image()
    boxes = detector.detect(image)
    assert boxes and all(b.score >= 0.5 for b in boxes)
    ink = np.asarray(image).min(axis=2) < 100
    from extensions_lib.detext.inpaint import text_mask

    mask = text_mask(image.size, boxes, dilate=0) > 0
    assert ink[mask].sum() / ink.sum() > 0.97                  # the drawn text is covered
    assert mask.mean() < 0.15                                   # and not the whole picture
    assert detector.detect(Image.new("RGB", (640, 480), BACKGROUND)) == []


def test_remove_text_changes_only_masked_pixels(detector):
    from extensions_lib.detext.inpaint import remove_text

    image, _ = text_image()
    result = remove_text(image, detector, passes=3)
    before, after = np.asarray(image), np.asarray(result.image)
    outside = result.mask == 0
    assert result.passes >= 1 and (before[outside] == after[outside]).all()
    assert (after.min(axis=2) < 100).sum() == 0                # no dark text pixels left
    assert detector.detect(result.image) == []


class FixedBoxes:
    def __init__(self, boxes):
        self.boxes, self.calls = boxes, 0

    def detect(self, image):
        self.calls += 1
        return self.boxes if self.calls == 1 else []


def test_mask_dilation_alpha_and_pass_loop():
    from extensions_lib.detext.detector import TextBox
    from extensions_lib.detext.inpaint import remove_text, text_mask

    box = TextBox(((10, 10), (20, 10), (20, 20), (10, 20)), 0.9)
    assert (text_mask((40, 40), [box], 0) > 0).sum() == 11 * 11
    assert (text_mask((40, 40), [box], 3) > 0).sum() > 15 * 15
    rgba = Image.new("RGBA", (40, 40), (10, 200, 10, 128))
    fake = FixedBoxes([box])
    result = remove_text(rgba, fake, passes=5)
    assert fake.calls == 2 and result.passes == 1                 # stops once nothing is found
    assert result.image.mode == "RGBA" and result.image.getchannel("A").getextrema() == (128, 128)


def test_command_writes_only_to_the_output(detector, tmp_path, capsys):
    from extensions_lib.cli import main

    src = tmp_path / "src"
    src.mkdir()
    text_image()[0].save(src / "sign.jpg", quality=95)
    (src / "sign.txt").write_text("a sign")
    Image.new("RGB", (64, 64), BACKGROUND).save(src / "plain.png")
    originals = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(["detext", str(src), str(tmp_path / "out"), "--device", "cpu", "--save-masks"]) == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == originals
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["detext.jsonl", "plain.png", "sign.mask.png", "sign.png", "sign.txt"]
    assert (out / "sign.txt").read_text() == "a sign" and (out / "plain.png").read_bytes() == originals["plain.png"]
    records = {r["image"]: r for r in map(json.loads, (out / "detext.jsonl").read_text().splitlines())}
    assert records["sign.jpg"]["text_boxes"] > 0 and records["plain.png"]["text_boxes"] == 0
    assert main(["detext", str(src), str(src)]) == 1
    assert "must not be the source folder" in capsys.readouterr().err


def test_model_inpainting_regenerates_only_the_mask(tiny_model):
    import torch

    from extensions_lib.detext.sd_inpaint import SdInpainter, SdInpaintSettings, region

    adapter = tiny_model("sd1")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8))
    mask = np.zeros((100, 120), np.uint8)
    mask[40:60, 32:80] = 255
    assert region(mask, 8) == (24, 32, 88, 68)
    decoded = []
    real_decode = adapter.decode_latents
    inpainter = SdInpainter(adapter, SdInpaintSettings(steps=4, resolution=64, padding=8))
    try:
        adapter.decode_latents = lambda latents: decoded.append(latents.clone()) or real_decode(latents)
        out = inpainter(image, mask)
        again = inpainter(image, mask)
    finally:
        adapter.decode_latents = real_decode
    before, after = np.asarray(image), np.asarray(out)
    assert (before[mask == 0] == after[mask == 0]).all() and (before[mask > 0] != after[mask > 0]).mean() > 0.9
    assert (np.asarray(again) == after).all()  # seeded
    # outside the latent mask the sampler ends exactly on the encoded original
    crop = image.crop((24, 32, 88, 68)).resize((64, 32), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        init = adapter.encode_images(pixels).mode().float()
    latent_mask = np.asarray(Image.fromarray(mask[32:68, 24:88]).resize((8, 4), Image.BOX)) > 0
    outside = torch.from_numpy(~latent_mask)[None, None].expand_as(init)
    assert torch.allclose(decoded[0].float()[outside], init[outside], atol=1e-4)
    assert not torch.allclose(decoded[0].float()[~outside], init[~outside], atol=1e-2)


def test_command_with_model_inpainting(detector, tmp_path, tiny_checkpoint, capsys):
    from extensions_lib.cli import main

    src = tmp_path / "src"
    src.mkdir()
    image, _ = text_image()
    image.save(src / "sign.png")
    assert main(["detext", str(src), str(tmp_path / "o1"), "--inpainter", "model"]) == 1
    assert "needs a checkpoint" in capsys.readouterr().err
    assert main(["detext", str(src), str(tmp_path / "o2"), "--inpainter", "model", "--ckpt",
                 str(tiny_checkpoint("sd1")), "--steps", "2", "--passes", "1", "--device", "cpu",
                 "--save-masks"]) == 0
    out = np.asarray(Image.open(tmp_path / "o2" / "sign.png"))
    mask = np.asarray(Image.open(tmp_path / "o2" / "sign.mask.png")) > 0
    assert mask.any() and (out[~mask] == np.asarray(image)[~mask]).all()
    assert (out[mask] != np.asarray(image)[mask]).any()
