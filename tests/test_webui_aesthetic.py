"""Aesthetic gradients inside the (stand-in) WebUI: the always-visible script, its patch, the host's cond cache."""
from __future__ import annotations

import pytest
import torch

from extensions_lib.aesthetic.file import save_aesthetic
from extensions_lib.host.aesthetic import script_arg_names
from webui_standin.harness import standin_host
from tests.aesthetic_fakes import make_hf_clip

PROMPT = "a zqxstyle castle on a hill"
NEGATIVE = "blurry"


def script_args(**values):
    defaults = {"embedding": "None", "weight": 0.9, "steps": 5, "lr": "0.0001", "slerp": False, "text": "",
                "slerp_angle": 0.1, "text_negative": False, "leave_negative": True}
    defaults.update(values)
    return [defaults[name] for name in script_arg_names()]


def load_extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


def run(host, model, **values):
    p = host.processing.StableDiffusionProcessingTxt2Img(model, prompt=PROMPT, negative_prompt=NEGATIVE)
    p.scripts = host.processing.always_on_scripts()
    p.script_args = script_args(**values)
    host.processing.prepare(p)
    info = host.processing.finish(p)
    return p, info


def standalone_expected(model, folder, family, clip, vector, **values):
    """The same personalisation through the standalone backend (checked against transformers elsewhere)."""
    from extensions_lib.aesthetic.file import AestheticEmbedding, vector_digest
    from extensions_lib.aesthetic.options import AestheticOptions
    from extensions_lib.aesthetic.standalone import StandaloneAesthetic
    from extensions_lib.embeddings.loader import EmbeddingLoader

    options = AestheticOptions(embedding="style", **values)
    aesthetic = StandaloneAesthetic(model, AestheticEmbedding("style", vector, vector_digest(vector)), options,
                                    clip_path=clip if family == "sd1" else None)
    with EmbeddingLoader(model, folder) as embeddings, aesthetic, torch.no_grad():
        fn = aesthetic.encode_fn(embeddings.encode, NEGATIVE)
        return fn(model, [PROMPT]), fn(model, [NEGATIVE])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_script_personalises_prompt_caches_and_undoes(tmp_path, tiny_checkpoint, tiny_model, family):
    from extensions_lib.formats.embedding import Embedding, write_embedding

    width = 32
    dim = 16 if family == "sd1" else 32
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    models = tmp_path / "models"
    save_aesthetic(vector, models / "aesthetic_embeddings" / "style.pt")
    clip = make_hf_clip(models / "aesthetic_clip" / "clip-vit-large-patch14")
    ti = tmp_path / "embeddings"
    write_embedding(Embedding("zqxstyle", torch.randn(2, width, generator=torch.Generator().manual_seed(5)) * 2),
                    ti / "zqxstyle.pt")
    on = dict(embedding="style", steps=3, lr="0.01")
    with standin_host(tmp_path) as host:
        extension = load_extension(host)
        model = host.load_model(tiny_checkpoint(family))
        cond = model.cond_stage_model
        plain, plain_info = run(host, model)
        assert "Aesthetic" not in plain_info and "TI hashes" in plain_info

        zero, _ = run(host, model, embedding="style", weight=0.0)
        assert torch.equal(zero.c, plain.c) and torch.equal(zero.uc, plain.uc)
        assert extension.aesthetic.personaliser.optimisations == 0

        first, info = run(host, model, **on)
        assert extension.aesthetic.personaliser.optimisations == 1     # the negative prompt is left alone
        assert not torch.allclose(first.c, plain.c) and torch.equal(first.uc, plain.uc)
        for text in ("Aesthetic LR: 0.01", "Aesthetic weight: 0.9", "Aesthetic steps: 3", "Aesthetic embedding: style",
                     "TI hashes"):
            assert text in info
        expected_c, expected_uc = standalone_expected(tiny_model(family), ti, family, clip, vector, steps=3, lr=0.01)
        torch.testing.assert_close(first.c, expected_c, rtol=1e-3, atol=5e-4)  # 3 steps at lr 0.01 amplify float noise
        torch.testing.assert_close(first.uc, expected_uc, rtol=1e-5, atol=1e-5)

        # patch gone after the job: the host's own encoding again, bit for bit
        assert "forward" not in vars(cond) and "encode_with_transformers" not in vars(cond)
        assert not extension.aesthetic.patched
        with torch.no_grad():
            assert torch.equal(model.get_learned_conditioning([PROMPT]), plain.c)

        again, _ = run(host, model, **on)
        assert extension.aesthetic.personaliser.optimisations == 1     # cache hit: no optimisation
        assert torch.equal(again.c, first.c)
        after, _ = run(host, model)                                    # the host's shared cache holds no personalised cond
        assert torch.equal(after.c, plain.c)

        both, _ = run(host, model, leave_negative=False, **on)
        assert extension.aesthetic.personaliser.optimisations == 2
        assert not torch.allclose(both.uc, plain.uc)


def test_wrong_width_embedding_is_reported_and_generation_goes_on(tmp_path, tiny_checkpoint, capsys):
    models = tmp_path / "models"
    save_aesthetic(torch.randn(1024), models / "aesthetic_embeddings" / "sd2style.pt")
    with standin_host(tmp_path) as host:
        extension = load_extension(host)
        model = host.load_model(tiny_checkpoint("sd2"))
        p, info = run(host, model, embedding="sd2style")
        assert "Aesthetic" not in info and p.c is not None and not extension.aesthetic.patched


def test_script_controls_follow_the_declared_options_and_paste_back(tmp_path, tiny_checkpoint):
    gr = pytest.importorskip("gradio")
    save_aesthetic(torch.randn(16), tmp_path / "models" / "aesthetic_embeddings" / "style.pt")
    with standin_host(tmp_path) as host:
        load_extension(host)
        script = next(s for s in host.processing.always_on_scripts() if s.title() == "Alchemy aesthetic gradients")
        with gr.Blocks():
            components = script.ui(False)
        assert len(components) == len(script_arg_names())
        assert components[0].choices[:2] in (["None", "style"], [("None", "None"), ("style", "style")])
        labels = {key: comp.label for comp, key in script.infotext_fields}
        assert labels["Aesthetic weight"] == "Aesthetic weight" and labels["Aesthetic embedding"] == "Aesthetic imgs embedding"
        assert [c.value for c in components[1:]] == script_args()[1:]


def test_create_route_and_train_tab_create_job(tmp_path, tiny_checkpoint):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from extensions_lib.aesthetic.file import load_aesthetic
    from tests.aesthetic_fakes import make_images

    make_hf_clip(tmp_path / "models" / "aesthetic_clip" / "clip-vit-large-patch14")
    images = make_images(tmp_path / "style", count=3)
    with standin_host(tmp_path) as host:
        extension = load_extension(host)
        host.shared.cmd_opts.api, host.shared.cmd_opts.api_auth = True, None
        app = FastAPI()
        host.script_callbacks.app_started_callback(None, app)
        client = TestClient(app)
        body = {"options": {"name": "web", "source": str(images), "batch_size": 2}, "wait": True}
        r = client.post("/alchemy/v1/create/aesthetic", json=body)
        assert r.status_code == 200, r.json()
        path = tmp_path / "models" / "aesthetic_embeddings" / "web.pt"
        assert r.json()["path"] == str(path) and load_aesthetic(path).dim == 16
        assert (r.json()["step"], r.json()["total"]) == (3, 3)
        assert extension.aesthetic.choices() == ["None", "web"]      # the txt2img dropdown lists it
        r = client.post("/alchemy/v1/create/aesthetic", json=body)
        assert r.status_code == 422 and "exists" in r.json()["error"]
        assert client.post("/alchemy/v1/create/nothing", json=body).status_code == 404


def test_works_with_a_hypernetwork_active(tmp_path, tiny_checkpoint):
    from extensions_lib.hypernetworks.file import write_hypernetwork
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

    models = tmp_path / "models"
    save_aesthetic(torch.randn(16, generator=torch.Generator().manual_seed(2)), models / "aesthetic_embeddings" / "style.pt")
    make_hf_clip(models / "aesthetic_clip" / "clip-vit-large-patch14")
    write_hypernetwork(Hypernetwork.create("hnet", [32, 64], Architecture(layer_structure=[1, 2, 1])),
                       models / "hypernetworks" / "hnet.pt")
    on = dict(embedding="style", steps=2, lr="0.01")
    with standin_host(tmp_path) as host:
        extension = load_extension(host)
        host.shared.reload_hypernetworks()
        model = host.load_model(tiny_checkpoint("sd1"))
        alone, _ = run(host, model, **on)
        p = host.processing.StableDiffusionProcessingTxt2Img(model, prompt=PROMPT + " <hypernet:hnet:0.5>",
                                                             negative_prompt=NEGATIVE)
        p.scripts = host.processing.always_on_scripts()
        p.script_args = script_args(**on)
        host.processing.prepare(p)
        assert [hn.name for hn in host.shared.loaded_hypernetworks] == ["hnet"]
        assert torch.equal(p.c, alone.c)                     # same personalised text, the network acts on the UNet
        assert extension.aesthetic.personaliser.optimisations == 1
        info = host.processing.finish(p)
        assert "Aesthetic embedding: style" in info
