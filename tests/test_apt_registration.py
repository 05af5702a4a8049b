"""APT everywhere the other methods are, from its one registration: ``alchemy apt create|train`` (with --help),
the API train route, saved training settings, and the Create/Train sub-tabs (the pair listing)."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from extensions_lib import cli
from extensions_lib.apt.options import AptTrainOptions
from extensions_lib.formats.embedding import read_embedding
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.methods import registry
from test_embeddings_train import make_dataset


def _cli_train_args(tmp_path, ckpt, *extra):
    return ["apt", "train", "--ckpt", str(ckpt), "--embedding-name", "zqpair", "--embeddings-dir",
            str(tmp_path / "emb"), "--data-root", str(tmp_path / "data"), "--template-file", "subject",
            "--training-width", "64", "--training-height", "64", "--steps", "2", "--seed", "3", "--save-every", "0",
            "--create-image-every", "0", "--log-directory", str(tmp_path / "logs"), *extra]


def test_cli_creates_and_trains_a_pair(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("sd1")
    with pytest.raises(SystemExit):
        cli.main(["apt", "train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--cfg-scale", "--neg-lr-scale", "--attention-masks", "--reconstruction", "--ema-decay-neg"):
        assert flag in help_text
    assert cli.main(["apt", "create", "--name", "zqpair", "--ckpt", str(ckpt), "--embeddings-dir",
                     str(tmp_path / "emb"), "--neg-vectors", "4", "--seed", "2"]) == 0
    created = capsys.readouterr().out.split()
    assert created == [str(tmp_path / "emb" / "zqpair.pt"), str(tmp_path / "emb" / "zqpair-neg.pt")]
    assert read_embedding(created[1]).num_vectors == 4 and read_embedding(created[0]).num_vectors == 3

    make_dataset(tmp_path / "data", 2)
    assert cli.main(_cli_train_args(tmp_path, ckpt, "--cfg-scale", "1")) == 1  # refused before the model load
    assert "learn nothing" in capsys.readouterr().err
    assert cli.main(_cli_train_args(tmp_path, ckpt, "--cfg-scale", "2-4:cos2", "--neg-lr-scale", "2")) == 0
    for name in ("zqpair", "zqpair-neg"):
        path = tmp_path / "emb" / f"{name}.pt"
        assert check_host_loadable(path) == [] and read_embedding(path).step == 2
    settings = json.loads(next((tmp_path / "logs").rglob("settings-*.json")).read_text())
    assert settings["cfg_scale"] == "2-4:cos2" and settings["neg_lr_scale"] == 2.0
    assert settings["provenance"]["method"] == "apt"


def test_api_trains_a_pair_with_the_hosts_folder(tiny_model, tmp_path):
    from extensions_lib.apt.create import create_pair
    from extensions_lib.apt.options import AptCreateOptions
    from extensions_lib.host.api import AlchemyApi
    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.thread_runner import ThreadJobRunner

    model = tiny_model("sd1")
    create_pair(model, AptCreateOptions(name="apipair", seed=0), directory=tmp_path / "emb")
    make_dataset(tmp_path / "data", 2)
    changed = []
    context = UIContext(model=lambda: model, embeddings_dir=tmp_path / "emb", log_root=tmp_path,
                        files_changed=changed.append)
    api = AlchemyApi(ThreadJobRunner(), lambda: context, lambda: [], lambda: [])
    options = {"embedding_name": "apipair", "data_root": str(tmp_path / "data"), "training_width": 64,
               "training_height": 64, "steps": 2, "save_every": 0, "create_image_every": 0, "seed": 1}
    status, body = api.train("apt", {"options": {**options, "cfg_scale": "1"}, "wait": True})
    assert status == 400 or status == 422, body
    assert "learn nothing" in body["error"]
    status, body = api.train("apt", {"options": options, "wait": True})
    assert status == 200, body
    assert body["final_path"] == str(tmp_path / "emb" / "apipair.pt") and body["state"] == "done"
    assert read_embedding(tmp_path / "emb" / "apipair-neg.pt").step == 2
    assert "embeddings" in changed


def test_settings_keys_and_defaults_come_from_the_registration():
    from extensions_lib.host import settings as st

    assert registry.find("apt").train_options is AptTrainOptions
    keys = st.training_keys()[AptTrainOptions]
    assert keys["learn_rate"] == "alchemy_train_apt_learn_rate"
    assert keys["steps"] == "alchemy_train_apt_steps"  # DreamArtist's 8000, not the shared default
    settings = {s.key: s for s in st.all_settings(lambda: [])}
    assert settings["alchemy_train_apt_steps"].default == 8000
    assert settings[keys["learn_rate"]].default == "0.003" and settings[keys["log_directory"]].default == "dream_artist"
    assert keys["batch_size"] == "alchemy_train_batch_size"  # same default as the others: the shared key
    defaults, problems = st.all_defaults(SimpleNamespace(alchemy_train_apt_steps=1500, alchemy_train_batch_size=2))
    assert problems == [] and (defaults[AptTrainOptions].steps, defaults[AptTrainOptions].batch_size) == (1500, 2)
    assert defaults[AptTrainOptions].cfg_scale == "3.0"


@pytest.mark.needs_gradio
def test_train_tab_lists_only_complete_pairs(tiny_model, tmp_path):
    gr = pytest.importorskip("gradio")
    from extensions_lib.apt.create import create_pair
    from extensions_lib.apt.options import AptCreateOptions
    from extensions_lib.embeddings.create import create_embedding
    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
    from extensions_lib.ui import build_train_tabs

    model = tiny_model("sd1")
    create_pair(model, AptCreateOptions(name="pair1", seed=0), directory=tmp_path / "emb")
    create_embedding(model, "lonely", directory=tmp_path / "emb")
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_train_tabs(ThreadJobRunner(), UIContext(model=lambda: model, embeddings_dir=tmp_path / "emb",
                                                          log_root=tmp_path), title_prefix="")
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["alchemy_train_apt_embedding_name"].choices == ["pair1"]
    assert by_id["alchemy_train_embedding_embedding_name"].choices == ["lonely", "pair1", "pair1-neg"]
    for option in ("cfg_scale", "neg_lr_scale", "attention_masks", "reconstruction", "ema_decay_neg"):
        assert f"alchemy_train_apt_{option}" in by_id
    assert "alchemy_create_apt_init_text_neg" in by_id and "alchemy_create_apt_start" in by_id
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("medvram", [False, True], ids=["plain", "medvram"])
def test_pair_created_and_trained_in_the_webui_with_reconstruction_reaches_the_hosts_prompts(tmp_path, medvram,
                                                                                             tiny_checkpoint):
    from extensions_lib.apt.jobs import create_apt_files, train_apt_file
    from extensions_lib.apt.options import AptCreateOptions
    from extensions_lib.jobs.training import CreateRequest, TrainRequest
    from test_webui_jobs import _extension
    from train_fakes import make_folder
    from webui_standin.harness import standin_host

    with standin_host(tmp_path, medvram=medvram) as host:
        extension = _extension(host)
        model = host.load_model(tiny_checkpoint("sd1"))
        runner = extension.runner
        created = runner.wait(runner.start(create_apt_files, CreateRequest(AptCreateOptions(name="zqart", seed=1),
                                                                           extension.context()),
                                           title="Creating zqart", panel="create_apt"), 60)
        assert created.state == "done", created.error
        db = host.sd_hijack.model_hijack.embedding_db
        start = {n: db.word_embeddings[n].vec.clone() for n in ("zqart", "zqart-neg")}  # the host saw both
        unet = [p for p in model.model.parameters()]
        assert all(p.requires_grad for p in unet)  # as the real host leaves it

        data = make_folder(tmp_path / "data", n=2, size=(64, 64))
        options = AptTrainOptions(embedding_name="zqart", data_root=str(data), training_width=64, training_height=64,
                                  steps=2, save_every=0, create_image_every=0, seed=3, reconstruction=True)
        if medvram:  # parts parked while others run: the reconstruction loss is refused, the rest trains
            refused = runner.wait(runner.start(train_apt_file, TrainRequest(options, extension.context()),
                                               title="Training zqart", panel="train_apt"), 300)
            assert refused.state == "failed" and "--medvram" in refused.error
            options = dataclasses.replace(options, reconstruction=False)
        trained = runner.wait(runner.start(train_apt_file, TrainRequest(options, extension.context()),
                                           title="Training zqart", panel="train_apt"), 300)
        assert trained.state == "done", trained.error
        for name, vec in start.items():
            after = db.word_embeddings[name]
            assert after.step == 2 and not torch.equal(after.vec, vec)  # reloaded with the trained vectors
        unet = list(model.model.parameters())  # (a --medvram host may have swapped the parameter objects)
        assert all(p.requires_grad and p.grad is None for p in unet)  # frozen for the run only, no stray grads
        assert all(p.grad is None for p in model.first_stage_model.parameters() if not p.is_meta)
        assert not any("forward" in vars(m) for m in model.first_stage_model.modules())  # checkpointing undone
