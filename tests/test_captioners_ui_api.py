"""The Captions tab and the /caption API routes run the same captioning as the CLI."""
from __future__ import annotations

import base64
import io

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.needs_gradio

from PIL import Image  # noqa: E402

from captioner_models import make_blip_folder  # noqa: E402
from extensions_lib.captioners import BlipOptions, load_blip  # noqa: E402


def _png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tab_captions_a_folder_through_the_shared_slot(tmp_path):
    from extensions_lib.ui.app import build_app
    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
    from test_ui_app import click_handler

    make_blip_folder(tmp_path / "models" / "captioners" / "tiny-blip")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(data / "a.png")
    context = UIContext(tagger_models_dir=tmp_path / "models" / "tagger", log_root=tmp_path,
                        cache_dir=tmp_path / "cache")
    runner = ThreadJobRunner()
    demo = build_app(runner, context)
    fn, inputs = click_handler(demo, "alchemy_captions_start")
    values = [getattr(c, "value", None) for c in inputs]
    names = [c.elem_id for c in inputs]
    values[names.index("alchemy_captions_blip")] = "tiny-blip"
    values[names.index("alchemy_captions_folder")] = str(data)
    values[names.index("alchemy_captions_compose_trigger_words")] = "sks"
    text = fn(*values)
    assert "1 captions written" in str(text), text
    sentence = load_blip(tmp_path / "models" / "captioners" / "tiny-blip", device="cpu").caption(
        [Image.open(data / "a.png").convert("RGB")], BlipOptions())[0]
    assert (data / "a.txt").read_text(encoding="utf-8") == f"sks, {sentence}"
    assert context.tagger().current is not None and context.tagger().current.kind == "blip"


def test_api_routes(tmp_path):
    from fastapi.testclient import TestClient
    from test_webui_api import _client, _extension
    from webui_standin.harness import standin_host

    with standin_host(tmp_path) as host:
        _extension(host)
        client: TestClient = _client(host)
        folder = tmp_path / "models" / "captioners" / "tiny-blip"
        make_blip_folder(folder)
        r = client.post("/alchemy/v1/caption/image", json={"image": _png_b64((200, 30, 30)),
                                                            "run": {"blip_model": "tiny-blip"},
                                                            "compose": {"trigger_words": ["sks"]}})
        assert r.status_code == 200, r.json()
        sentence = load_blip(folder, device="cpu").caption([Image.new("RGB", (40, 30), (200, 30, 30))])[0]
        assert r.json()["caption"] == f"sks, {sentence}"
        r = client.post("/alchemy/v1/caption/image", json={"image": _png_b64((0, 0, 0)), "run": {"blip_model": "nope"}})
        assert r.status_code == 404 and "nope" in r.json()["error"]
        r = client.post("/alchemy/v1/caption/image", json={"image": _png_b64((0, 0, 0))})
        assert r.status_code == 400 and r.json()["fix"]
        r = client.post("/alchemy/v1/caption/folder", json={"folder": str(tmp_path / "absent"),
                                                             "run": {"blip_model": "tiny-blip"}})
        assert r.status_code == 404
        data = tmp_path / "imgs"
        data.mkdir()
        for i in range(2):
            Image.new("RGB", (30, 30), (90 * i, 20, 20)).save(data / f"{i}.png")
        r = client.post("/alchemy/v1/caption/folder", json={"folder": str(data), "wait": True,
                                                             "run": {"blip_model": "tiny-blip"},
                                                             "compose": {"outputs": ["metadata_jsonl"]}})
        assert r.status_code == 200 and r.json()["written"] == 2, r.json()
        assert len((data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()) == 2
