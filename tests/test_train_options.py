"""The shared training options: WebUI settings files load, CLI flags render, methods extend; provenance."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from extensions_lib.errors import AlchemyError
from extensions_lib.options import add_cli_arguments, from_cli, from_dict, option, specs, to_dict
from extensions_lib.train.dataset import scan_folder
from extensions_lib.train.options import TrainingOptions
from extensions_lib.train.provenance import Provenance, collect
from train_fakes import FakeAdapter, make_folder


@pytest.mark.parametrize("name", ["ref-emb-2v-trained.train-settings.json", "ref-hn-121-relu-trained.train-settings.json"])
def test_webui_settings_json_loads(webui_files, name):
    raw = json.loads((webui_files / name).read_text())
    options = from_dict(TrainingOptions, raw, source=name)
    shared = {k: v for k, v in raw.items() if k in to_dict(options)}
    assert len(shared) >= 12  # learn_rate, batch_size, gradient_step, data_root, ... are the host's own keys
    assert {k: to_dict(options)[k] for k in shared} == shared


def test_cli_flags_render_and_parse():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser, TrainingOptions)
    assert from_cli(TrainingOptions, parser.parse_args([])) == TrainingOptions()
    args = parser.parse_args(["--learn-rate", "0.1:10, 0.01", "--varsize", "--clip-grad-mode", "norm",
                              "--gradient-step", "4", "--tag-drop-out", "0.2", "--resume", "logs/x"])
    o = from_cli(TrainingOptions, args)
    assert (o.learn_rate, o.varsize, o.clip_grad_mode, o.gradient_step, o.tag_drop_out, o.resume) == \
        ("0.1:10, 0.01", True, "norm", 4, 0.2, "logs/x")


@pytest.mark.parametrize("key, value", [("latent_sampling_method", "sometimes"), ("tag_drop_out", 1.5),
                                        ("clip_grad_mode", "clamp"), ("batch_size", 0), ("steps", "many")])
def test_bad_values_are_named(key, value):
    with pytest.raises(AlchemyError, match=key):
        from_dict(TrainingOptions, {key: value})


def test_methods_extend_by_inheritance():
    @dataclass
    class EmbeddingOptions(TrainingOptions):
        embedding_name: str = option("", help="embedding to train")
        learn_rate: str = option("0.005", help="overridden default")

    names = [s.name for s in specs(EmbeddingOptions)]
    assert names[-1] == "embedding_name" and names.count("learn_rate") == 1
    assert set(names) - {"embedding_name"} == {s.name for s in specs(TrainingOptions)}


def test_provenance_from_adapter_and_dataset(tmp_path):
    ds = scan_folder(make_folder(tmp_path, 3), width=64, height=64)
    p = collect(FakeAdapter(), ds, source_note="my own photos", method="textual_inversion")
    assert (p.base_model_name, p.base_model_hash, p.dataset_images, p.dataset_hash) == \
        ("fake-model", "0123456789", 3, ds.content_hash)
    meta = p.to_metadata()
    assert meta["alchemy_source_note"] == "my own photos" and all(isinstance(v, str) for v in meta.values())
    assert Provenance.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_eight_bit_adam_falls_back_with_a_message(monkeypatch):
    import importlib.util

    import torch

    from extensions_lib.train.optimizers import adamw

    real = importlib.util.find_spec  # only bitsandbytes missing (other libraries imported meanwhile must be found)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k))
    w = torch.zeros(3, requires_grad=True)
    opt, note = adamw([{"params": [w]}], 0.01, eight_bit=True)
    assert type(opt) is torch.optim.AdamW and "bitsandbytes" in note
    opt, note = adamw([{"params": [w]}], 0.01)
    assert type(opt) is torch.optim.AdamW and note == "optimizer: AdamW"
