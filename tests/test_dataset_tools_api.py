"""HTTP routes of the tag editor and the dataset checks, on the same AlchemyApi/register as the tagger's."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytestmark = pytest.mark.needs_gradio  # the UI stack (fastapi/httpx) lives in the main environment only

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from extensions_lib.host.api import AlchemyApi, register  # noqa: E402
from extensions_lib.jobs.context import UIContext  # noqa: E402
from extensions_lib.jobs.thread_runner import ThreadJobRunner  # noqa: E402
from tests.face_models import make_yunet_like  # noqa: E402
from tests.test_tag_editor import CAPTIONS, caption, make_dataset  # noqa: E402

V1 = "/alchemy/v1"


@pytest.fixture
def client(tmp_path):
    api = AlchemyApi(ThreadJobRunner(), lambda: UIContext(cache_dir=tmp_path / "cache"), lambda: [], lambda: [])
    app = FastAPI()
    register(app, api)
    return TestClient(app)


def test_tags_list_edit_undo(client, tmp_path):
    ds = make_dataset(tmp_path / "ds")
    r = client.post(f"{V1}/tags/list", json={"folder": str(ds), "select": {"include": ["smile"]}})
    assert r.status_code == 200
    assert r.json()["matched"] == 2 and r.json()["tags"][0] == ["smile", 2]
    body = {"folder": str(ds), "action": "replace", "find": "smile", "replacement": "grin"}
    r = client.post(f"{V1}/tags/edit", json={**body, "dry_run": True})
    assert [c["image"] for c in r.json()["changed"]] == ["a.png", "c.png"]
    assert caption(ds, "a.png") == CAPTIONS["a.png"]
    r = client.post(f"{V1}/tags/edit", json=body)
    assert r.status_code == 200 and caption(ds, "c.png") == "1boy, grin, hat" and r.json()["snapshot"]
    r = client.post(f"{V1}/tags/edit", json={"folder": str(ds), "action": "remove", "tags": "1girl, short hair",
                                            "images": ["b.png"]})
    assert r.json()["changed"] == [] and "empty" in r.json()["skipped"][0][1]
    assert client.post(f"{V1}/tags/undo", json={"folder": str(ds)}).status_code == 200
    assert caption(ds, "c.png") == CAPTIONS["c.png"]


def test_tags_errors_have_honest_codes(client, tmp_path):
    ds = make_dataset(tmp_path / "ds")
    assert client.post(f"{V1}/tags/list", json={"folder": str(tmp_path / "nope")}).status_code == 404
    r = client.post(f"{V1}/tags/edit", json={"folder": str(ds), "action": "explode"})
    assert r.status_code == 400 and "unknown action" in r.json()["error"]
    r = client.post(f"{V1}/tags/list", json={"folder": str(ds), "select": {"bogus": 1}})
    assert r.status_code == 400 and "bogus" in r.json()["error"]
    r = client.post(f"{V1}/tags/edit", json={"folder": str(ds), "action": "add", "tags": ["x"], "images": ["../a.png"]})
    assert r.status_code == 400 and "no image" in r.json()["error"]


def test_faces_folder_job(client, tmp_path):
    import numpy as np
    from PIL import Image

    ds = tmp_path / "faces"
    ds.mkdir()
    arr = np.zeros((128, 128, 3), np.uint8)
    arr[32:64, 64:96] = (0, 0, 255)
    Image.fromarray(arr).save(ds / "one.png")
    model = make_yunet_like(tmp_path / "yunet.onnx")
    r = client.post(f"{V1}/faces/folder", json={"folder": str(ds), "model": {"model": str(model)}, "wait": True})
    assert r.status_code == 200, r.json()
    assert r.json()["total"] == 1 and r.json()["flagged"] == []
    assert json.loads((ds / "faces.jsonl").read_text())["faces"] == 1
    r = client.post(f"{V1}/faces/folder", json={"folder": str(ds), "model": {"model": str(tmp_path / "x.onnx")},
                                                "wait": True})
    assert r.status_code == 422 and "not found" in r.json()["error"]
