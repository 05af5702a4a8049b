"""Face detectors on tiny models with the real interfaces: YuNet through the real cv2.FaceDetectorYN (channel
order regression), the anime YOLOv8 decoder, the Haar fallback, model lookup/download, the face-centred crop,
and `alchemy faces`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.faces import Face, face_points
from extensions_lib.faces.base import nms
from tests.face_models import make_yolov8_like, make_yunet_like

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def yunet_file(tmp_path_factory):
    return make_yunet_like(tmp_path_factory.mktemp("yunet") / "face_detection_yunet_2023mar.onnx")


@pytest.fixture(scope="module")
def yolo_file(tmp_path_factory):
    return make_yolov8_like(tmp_path_factory.mktemp("anime") / "model.onnx")


def square(colour, size=(128, 128), box=(64, 32, 96, 64)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = colour
    return Image.fromarray(arr)


def test_yunet_gets_bgr_where_the_webui_passed_rgb(yunet_file):
    from extensions_lib.faces.yunet import YuNetDetector

    detector = YuNetDetector(yunet_file)
    blue = square((0, 0, 255))  # PIL is RGB: this square is blue, the tiny model's "face"
    faces = detector.detect(blue)
    assert len(faces) == 1
    assert (faces[0].x, faces[0].y, faces[0].w, faces[0].h) == (64, 32, 32, 32) and faces[0].score > 0.99
    assert detector.detect(square((255, 0, 0))) == []  # a red square is not one
    # What the WebUI did: the RGB array straight into the detector, so blue arrived as red and was missed.
    webui = cv2.FaceDetectorYN.create(str(yunet_file), "", (128, 128), 0.9, 0.3, 5000)
    _, rows = webui.detect(np.asarray(blue))
    assert rows is None
    # RGBA and greyscale inputs are converted too (transparent pixels show as white)
    assert len(detector.detect(blue.convert("RGBA"))) == 1


def test_yunet_bad_file_is_a_clear_error(tmp_path):
    from extensions_lib.faces.yunet import YuNetDetector

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(AlchemyError, match="could not load"):
        YuNetDetector(bad)


def test_anime_yolov8_decoding(yolo_file):
    from extensions_lib.faces.anime import AnimeFaceDetector, scaled_size

    assert scaled_size(1000, 800, 1216) == (1024, 800)        # long side within imgsz: only aligned up
    assert scaled_size(2000, 1000, 640) == (640, 320)
    detector = AnimeFaceDetector(yolo_file)
    assert detector.max_size == 64 and detector.names == {0: "face"}
    faces = detector.detect(square((255, 0, 0), box=(64, 0, 128, 64)))  # 128 px image scaled to 64: boxes x2
    assert [(f.x, f.y, f.w, f.h) for f in faces] == [(64.0, 0.0, 64.0, 64.0)]
    assert detector.detect(square((0, 0, 255), box=(64, 0, 128, 64))) == []  # model is RGB: blue is no face


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]
    assert nms(boxes, [0.8, 0.9, 0.7], 0.5) == [1, 2]
    assert nms(boxes, [0.8, 0.9, 0.7], 0.99) == [1, 0, 2]


def test_face_points_sit_a_third_down_the_box():
    class One:
        def detect(self, image):
            return [Face(10, 20, 30, 60, 0.95)]

    assert face_points(One())(None) == [(25.0, 20 + 60 * 0.33)]


def test_haar_rows_are_iterated_not_truth_tested(monkeypatch):
    from extensions_lib.faces.haar import HaarDetector

    detector = HaarDetector()
    found = np.array([[1, 2, 30, 40], [50, 60, 20, 20]], dtype=np.int32)  # what detectMultiScale returns
    monkeypatch.setattr(detector, "_classifier", type("C", (), {"detectMultiScale": lambda *a, **k: found})())
    faces = detector.detect(Image.new("RGB", (100, 100)))
    assert [(f.x, f.y, f.w, f.h) for f in faces] == [(1, 2, 30, 40), (50, 60, 20, 20)]
    with pytest.raises(ValueError):  # the WebUI's `if faces:` on the same array
        bool(found)


def test_model_lookup_and_offline_download(tmp_path, yunet_file, monkeypatch):
    from extensions_lib.faces import models
    from extensions_lib.faces.load import load_detector

    with pytest.raises(AlchemyError, match="--download"):
        models.yunet_path(None, tmp_path)
    with pytest.raises(AlchemyError, match="HF_HUB_OFFLINE") as info:
        models.yunet_path(None, tmp_path, download=True)
    assert "opencv_zoo" in info.value.message and not (tmp_path / "opencv").exists()
    (tmp_path / "opencv").mkdir()
    (tmp_path / "opencv" / models.YUNET.filename).write_bytes(yunet_file.read_bytes())
    assert len(load_detector("yunet", models_dir=tmp_path).detect(square((0, 0, 255)))) == 1
    with pytest.raises(AlchemyError, match="anime face model not found"):
        load_detector("anime", models_dir=tmp_path)


def test_pinned_download_checks_size_and_checksum(tmp_path, monkeypatch):
    import io
    import hashlib

    from extensions_lib.faces import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    payload = b"x" * 100
    good = models.PinnedFile("m.onnx", "https://example.invalid/m.onnx", 100, hashlib.sha256(payload).hexdigest()[:8], "MIT")
    monkeypatch.setattr(models.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    assert models.fetch_pinned(good, tmp_path, reachable=lambda: True).read_bytes() == payload
    bad = models.PinnedFile("n.onnx", good.url, 100, "00000000", "MIT")
    with pytest.raises(AlchemyError, match="checksum"):
        models.fetch_pinned(bad, tmp_path, reachable=lambda: True)
    assert not (tmp_path / "n.onnx").exists() and not list(tmp_path.glob(".n.onnx*"))
    with pytest.raises(AlchemyError, match="cannot be reached"):
        models.fetch_pinned(models.PinnedFile("o.onnx", good.url, 1, "", "MIT"), tmp_path, reachable=lambda: False)


def test_face_centred_crop_in_preprocess(tmp_path, yunet_file):
    from extensions_lib.preprocess.options import PreprocessOptions
    from extensions_lib.preprocess.run import preprocess_directory
    from extensions_lib.faces.yunet import YuNetDetector

    src = tmp_path / "src"
    src.mkdir()
    square((0, 0, 255), size=(256, 128), box=(192, 64, 224, 96)).save(src / "face.png")
    Image.new("RGB", (256, 128)).save(src / "none.png")
    options = PreprocessOptions(width=64, height=64, face_crop=True, face_crop_scale=2.0)
    summary = preprocess_directory(src, tmp_path / "dst", options, face_detector=YuNetDetector(yunet_file))
    outputs = sorted(p.name for p in (tmp_path / "dst").glob("*.png"))
    assert outputs == ["00000-0-face.png", "00001-0-none.png"]  # the face crop replaces the plain one
    crop = np.asarray(Image.open(tmp_path / "dst" / "00000-0-face.png"))
    # a 64 px crop centred on the 32 px face: the face fills the middle half
    assert crop[32, 32, 2] > 200 and crop[32, 32, 0] < 50 and crop[4, 4].max() < 50
    assert any("none.png: no face found" in n for n in summary.notes)


def test_faces_command_counts_and_moves(tmp_path, yunet_file, capsys):
    from extensions_lib.cli import main

    ds = tmp_path / "ds"
    ds.mkdir()
    square((0, 0, 255)).save(ds / "one.png")
    (ds / "one.txt").write_text("a face")
    Image.new("RGB", (64, 64)).save(ds / "empty.png")
    (ds / "empty.txt").write_text("nothing")
    assert main(["faces", str(ds), "--model", str(yunet_file), "--min-faces", "1", "--action", "move",
                 "--move-to", str(tmp_path / "aside")]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) with 0 face(s)" in out and "1 image(s) with 1 face(s)" in out
    assert (tmp_path / "aside" / "empty.png").is_file() and (tmp_path / "aside" / "empty.txt").read_text() == "nothing"
    assert (ds / "one.png").is_file() and not (ds / "empty.png").exists()
    records = [json.loads(l) for l in (ds / "faces.jsonl").read_text().splitlines()]
    assert {r["image"]: (r["faces"], r["flagged"]) for r in records} == {"empty.png": (0, True), "one.png": (1, False)}
    assert records[1]["boxes"][0]["box"] == [64.0, 32.0, 32.0, 32.0]


def test_focal_crop_follows_yunet_faces(tmp_path, yunet_file):
    from extensions_lib.faces.yunet import YuNetDetector
    from extensions_lib.preprocess.options import PreprocessOptions
    from extensions_lib.preprocess.run import derive_images

    img = square((0, 0, 255), size=(512, 128), box=(416, 32, 448, 64))  # a "face" near the right edge
    options = PreprocessOptions(width=128, height=128, focal_crop=True, focal_face_weight=1.0,
                                focal_entropy_weight=0.0, focal_edges_weight=0.0)
    crop = np.asarray(derive_images(img, options, YuNetDetector(yunet_file)).images[0])
    assert crop[:, :, 2].max() > 200                      # the face is inside the crop
    without = np.asarray(derive_images(img, options, None).images[0])
    assert without[:, :, 2].max() < 50                    # no faces: the centre crop misses it


def test_scan_skips_bad_files_reports_progress_and_stops(tmp_path):
    from extensions_lib.checks.scan import scan_folder

    for name in ("a.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"broken")
    seen = []
    summary = scan_folder(tmp_path, lambda image, path: {"w": image.width}, lambda r: False,
                          progress=lambda done, total: seen.append((done, total)), manifest=tmp_path / "m.jsonl")
    assert seen[-1] == (3, 3) and summary.skipped[0][0] == "b.png"
    assert [json.loads(l).get("w") for l in (tmp_path / "m.jsonl").read_text().splitlines()] == [8, None, 8]
    calls = []
    stopped = scan_folder(tmp_path, lambda image, path: calls.append(1) or {}, lambda r: False,
                          should_stop=lambda: len(calls) >= 1)
    assert stopped.interrupted and len(calls) == 1
