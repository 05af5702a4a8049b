"""The HTTP API the extension adds in on_app_started: same jobs as the tabs, honest status codes."""
from __future__ import annotations

import base64
import io
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from train_fakes import make_folder  # noqa: E402
from webui_standin.harness import standin_host  # noqa: E402

V1 = "/alchemy/v1"


def _extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


def _client(host, api=True, api_auth=None):
    host.shared.cmd_opts.api = api
    host.shared.cmd_opts.api_auth = api_auth
    app = FastAPI()
    host.script_callbacks.app_started_callback(None, app)
    assert host.script_callbacks.errors == []
    return TestClient(app)


@pytest.fixture
def webui(tmp_path, tiny_checkpoint):
    from extensions_lib.hypernetworks.file import write_hypernetwork
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

    with standin_host(tmp_path) as host:
        extension = _extension(host)
        host.load_model(tiny_checkpoint("sd1"))
        torch.manual_seed(0)
        hn = Hypernetwork.create("hnet", [32, 64], Architecture(layer_structure=[1, 2, 1]))
        write_hypernetwork(hn, tmp_path / "models" / "hypernetworks" / "hnet.pt")
        yield host, extension, _client(host)


def _png_b64(color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _train_body(data, **changes):
    options = dict(hypernetwork_name="hnet", data_root=str(data), training_width=64, training_height=64, steps=2,
                   learn_rate="1e-3", save_every=0, create_image_every=0, seed=1, template_file="filewords")
    options.update(changes)
    return {"options": options}


def _poll(client, job_id, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        r = client.get(f"{V1}/jobs/{job_id}")
        assert r.status_code == 200
        if r.json()["state"] in ("done", "cancelled", "failed"):
            return r.json()
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_listings(webui, tmp_path):
    from extensions_lib.formats.embedding import Embedding, write_embedding

    host, extension, client = webui
    write_embedding(Embedding("zqxstyle", torch.randn(2, 32)), tmp_path / "embeddings" / "zqxstyle.pt")
    extension.files_changed("embeddings")
    r = client.get(f"{V1}/embeddings")
    assert r.status_code == 200
    assert [(e["name"], e["usable"], e["vectors"]) for e in r.json()["embeddings"]] == [("zqxstyle", True, 2)]
    r = client.get(f"{V1}/hypernetworks")
    assert r.status_code == 200
    assert [(h["name"], h["widths"]) for h in r.json()["hypernetworks"]] == [("hnet", [32, 64])]


def test_tagging(webui, tmp_path):
    from tagger_models import make_wd14_folder

    host, extension, client = webui
    make_wd14_folder(tmp_path / "models" / "tagger" / "wd-tiny")
    r = client.post(f"{V1}/tag/image", json={"image": _png_b64(), "model": "wd-tiny"})
    assert r.status_code == 200, r.json()
    caption = r.json()["caption"]
    assert isinstance(caption, str)
    # the same caption the tab's job gives for this image
    from PIL import Image

    from extensions_lib.tagger import CaptionOptions, caption_images, load_tagger

    image = Image.open(io.BytesIO(base64.b64decode(_png_b64()))).convert("RGB")
    assert caption == caption_images(load_tagger(tmp_path / "models" / "tagger" / "wd-tiny"), [image], CaptionOptions())[0]

    assert client.post(f"{V1}/tag/image", json={"image": "%%%", "model": "wd-tiny"}).status_code == 400
    assert client.post(f"{V1}/tag/image", json={"image": base64.b64encode(b"text").decode(),
                                                 "model": "wd-tiny"}).status_code == 400
    r = client.post(f"{V1}/tag/image", json={"image": _png_b64(), "model": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = client.post(f"{V1}/tag/image", json={"image": _png_b64(), "model": "wd-tiny", "options": {"treshold": 1}})
    assert r.status_code == 400 and "treshold" in r.json()["error"]
    r = client.post(f"{V1}/tag/image", json={"image": _png_b64()})
    assert r.status_code == 400 and r.json()["fix"]  # no model given, none set as default

    r = client.post(f"{V1}/tag/folder", json={"folder": str(tmp_path / "absent"), "model": "wd-tiny"})
    assert r.status_code == 404 and "absent" in r.json()["path"]
    folder = make_folder(tmp_path / "imgs", n=3, captions=False)
    host.shared.opts.data["alchemy_tagger_model"] = "wd-tiny"  # the settings' default model
    r = client.post(f"{V1}/tag/folder", json={"folder": str(folder), "wait": True})
    assert r.status_code == 200, r.json()
    assert r.json()["written"] == 3 and len(list(folder.glob("*.txt"))) == 3
    r = client.post(f"{V1}/tag/folder", json={"folder": str(folder)})
    assert r.status_code == 202 and _poll(client, r.json()["job_id"])["state"] == "done"


def test_training_endpoints(webui, tmp_path):
    host, extension, client = webui
    data = make_folder(tmp_path / "data", n=2, size=(64, 64))
    assert client.post(f"{V1}/train/lycoris", json=_train_body(data)).status_code == 404
    r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data, steps="many"))
    assert r.status_code == 400 and "steps" in r.json()["error"]
    r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data, data_root=str(tmp_path / "absent")))
    assert r.status_code == 404
    r = client.post(f"{V1}/train/hypernetwork", json={"options": {"data_root": str(data)}})
    assert r.status_code == 400 and "hypernetwork_name" in r.json()["error"]
    for bad in ("../../hnet", "/abs/hnet", ".."):  # request names never become paths unchecked
        r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data, hypernetwork_name=bad))
        assert r.status_code == 400 and "hypernetwork_name" in r.json()["error"], bad
    assert client.post(f"{V1}/jobs/stop").status_code == 409  # nothing to stop

    r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data))
    assert r.status_code == 202, r.json()
    job_id = r.json()["job_id"]
    final = _poll(client, job_id)
    assert final["state"] == "done" and final["step"] == 2 and len(final["loss_points"]) == 2
    assert client.get(f"{V1}/jobs/current").json()["job_id"] == job_id
    assert client.get(f"{V1}/jobs/nope").status_code == 404

    with host.call_queue.queue_lock:  # a generation is running: ours queues, a second is refused
        r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data, steps=50))
        assert r.status_code == 202
        r2 = client.post(f"{V1}/train/hypernetwork", json=_train_body(data))
        assert r2.status_code == 409 and "another Alchemy job" in r2.json()["error"]
        assert client.post(f"{V1}/jobs/stop").status_code == 200
    assert _poll(client, r.json()["job_id"])["state"] == "cancelled"

    r = client.post(f"{V1}/train/hypernetwork", json={**_train_body(data, hypernetwork_name="gone"), "wait": True})
    assert r.status_code == 422 and "gone" in r.json()["error"]  # the job ran and failed: never 200
    r = client.post(f"{V1}/train/hypernetwork", json={**_train_body(data, steps=1), "wait": True})
    assert r.status_code == 200 and r.json()["final_path"].endswith("hnet.pt")


def test_training_takes_the_webuis_template_names(webui, tmp_path):
    host, _extension, client = webui
    data = make_folder(tmp_path / "data", n=2, size=(64, 64))
    for name in ("hypernetwork", "none.txt"):  # the WebUI's own defaults for hypernetworks
        r = client.post(f"{V1}/train/hypernetwork", json={**_train_body(data, steps=1, template_file=name),
                                                          "wait": True})
        assert r.status_code == 200, r.json()
    r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data, template_file="no_such_template"))
    assert r.status_code == 400 and "subject_filewords" in r.json()["error"]


def test_no_model_loaded_is_503(tmp_path):
    with standin_host(tmp_path) as host:
        _extension(host)
        client = _client(host)
        data = make_folder(tmp_path / "data", n=1, size=(64, 64))
        r = client.post(f"{V1}/train/embedding", json={"options": {"embedding_name": "x", "data_root": str(data)}})
        assert r.status_code == 503 and "checkpoint" in r.json()["error"]
        assert client.get(f"{V1}/embeddings").status_code == 200


def test_training_under_lowvram_is_refused_like_the_tab_does(webui, tmp_path):
    host, extension, client = webui
    host.shared.cmd_opts.lowvram = True
    data = make_folder(tmp_path / "data", n=1, size=(64, 64))
    r = client.post(f"{V1}/train/hypernetwork", json=_train_body(data))
    assert r.status_code == 501 and "--medvram" in r.json()["error"]
    assert extension.context().unsupported["train_hypernetwork"] == r.json()["what"]


def test_the_api_follows_the_webuis_api_switch(tmp_path):
    """Like /sdapi: no routes without --api (a --listen WebUI must not let anyone start jobs)."""
    with standin_host(tmp_path) as host:
        _extension(host)
        client = _client(host, api=False)
        assert client.get(f"{V1}/embeddings").status_code == 404
        assert client.post(f"{V1}/jobs/stop").status_code == 404
        assert client.get("/alchemy/progress").status_code == 200  # the tabs' progress poll stays


def test_api_auth_is_asked_for_on_every_route(tmp_path):
    with standin_host(tmp_path) as host:
        _extension(host)
        client = _client(host, api_auth="alice:s3cret:x,bob:hunter2")
        for method, path in [("get", "/embeddings"), ("post", "/jobs/stop"), ("get", "/jobs/current"),
                             ("post", "/tag/image"), ("post", "/train/embedding")]:
            r = getattr(client, method)(V1 + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", path
            r = getattr(client, method)(V1 + path, auth=("bob", "wrong"))
            assert r.status_code == 401, path
        assert client.get(f"{V1}/embeddings", auth=("alice", "s3cret:x")).status_code == 200
        assert client.get(f"{V1}/embeddings", auth=("bob", "hunter2")).status_code == 200
        assert client.post(f"{V1}/jobs/stop", auth=("bob", "hunter2")).status_code == 409  # authorised; no job


def test_a_malformed_api_auth_leaves_the_api_off(tmp_path):
    with standin_host(tmp_path) as host:
        _extension(host)
        client = _client(host, api_auth="no-colon-here")
        assert client.get(f"{V1}/embeddings").status_code == 404


def test_create_routes_take_the_create_tabs_options(webui, tmp_path):
    from extensions_lib.hypernetworks.file import read_hypernetwork

    host, _extension, client = webui
    r = client.post(f"{V1}/create/hypernetwork",
                    json={"options": {"name": "fresh", "sizes": [768, 320], "layer_structure": "1, 3, 1",
                                      "activation_func": "relu"}})  # a WebUI /sdapi name for "activation"
    assert r.status_code == 200, r.json()
    hn = read_hypernetwork(r.json()["path"])
    assert hn.sizes == [768, 320] and list(hn.arch.layer_structure) == [1, 3, 1] and hn.arch.activation_func == "relu"
    assert "fresh" in [h["name"] for h in client.get(f"{V1}/hypernetworks").json()["hypernetworks"]]
    assert "fresh" in host.shared.hypernetworks  # the host's own list knows it at once

    r = client.post(f"{V1}/create/embedding", json={"options": {"name": "newtok", "init_text": "cat",
                                                                 "num_vectors_per_token": 3}})
    assert r.status_code == 200, r.json()
    listed = {e["name"]: e for e in client.get(f"{V1}/embeddings").json()["embeddings"]}
    assert listed["newtok"]["vectors"] == 3 and listed["newtok"]["usable"]
    db = host.sd_hijack.model_hijack.embedding_db
    assert "newtok" in db.word_embeddings  # the WebUI's database reloaded: usable in prompts without a refresh

    again = client.post(f"{V1}/create/embedding", json={"options": {"name": "newtok"}})
    assert again.status_code in (400, 409, 422) and "exists" in again.json()["error"]
    assert client.post(f"{V1}/create/hypernetwork", json={"options": {"name": ""}}).status_code == 400
    assert client.post(f"{V1}/create/hypernetwork", json={"options": {"nope": 1}}).status_code == 400
    assert client.post(f"{V1}/create/dreambooth", json={}).status_code == 404
