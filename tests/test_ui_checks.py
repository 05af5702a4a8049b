"""The checks tab runs the faces / watermark / text-removal jobs with the options it renders."""
from __future__ import annotations

import json

import numpy as np
import pytest

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.needs_gradio

from PIL import Image  # noqa: E402

from extensions_lib.jobs.context import UIContext  # noqa: E402
from extensions_lib.ui.tab_checks import build_checks  # noqa: E402
from extensions_lib.jobs.thread_runner import ThreadJobRunner  # noqa: E402
from tests.face_models import make_yunet_like  # noqa: E402
from tests.test_ui_app import click_handler  # noqa: E402


def test_faces_check_from_the_tab(tmp_path):
    with gr.Blocks() as demo:
        build_checks(ThreadJobRunner(), UIContext(cache_dir=tmp_path / "cache"))
    fn, inputs = click_handler(demo, "alchemy_checks_start")
    ds = tmp_path / "ds"
    ds.mkdir()
    arr = np.zeros((128, 128, 3), np.uint8)
    arr[32:64, 64:96] = (0, 0, 255)
    Image.fromarray(arr).save(ds / "face.png")
    Image.new("RGB", (64, 64)).save(ds / "none.png")
    model = make_yunet_like(tmp_path / "yunet.onnx")
    values = [c.value for c in inputs]
    by_id = {c.elem_id: i for i, c in enumerate(inputs)}
    values[0], values[1], values[2], values[3] = str(ds), "faces", str(model), str(tmp_path / "aside")
    values[by_id["alchemy_checks_faces_scan_min_faces"]] = 1
    values[by_id["alchemy_checks_faces_scan_action"]] = "move"
    text = fn(*values)
    assert text.startswith("Finished") and "2 images checked, 1 flagged" in text, text
    assert (tmp_path / "aside" / "none.png").is_file() and (ds / "face.png").is_file()
    records = [json.loads(l) for l in (ds / "faces.jsonl").read_text().splitlines()]
    assert [r["faces"] for r in records] == [1, 0]
    values[1], values[3] = "text removal", ""
    assert "no output folder" in fn(*values)
    values[0] = str(tmp_path / "missing")
    assert "image folder not found" in fn(*values)
