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
