"""``alchemy make-tiny-model`` and ``alchemy inspect``."""
from __future__ import annotations

import hashlib
import json

import pytest

from extensions_lib.backend.configs import build_modules, load_config
from extensions_lib.backend.tiny import tiny_config
from extensions_lib.cli import main


@pytest.mark.parametrize("family,suffix", [("sd1", "safetensors"), ("sd2-v", "ckpt")])
def test_make_tiny_model_then_inspect(tmp_path, capsys, family, suffix):
    out = tmp_path / f"m.{suffix}"
    assert main(["make-tiny-model", str(out), "--family", family, "--seed", "1"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file"] == out.name
    assert info["family"] == family.split("-")[0]
    assert info["prediction_type"] == ("v" if family == "sd2-v" else "eps")
    assert info["context_dim"] == 32
    assert info["text_encoder"] == ("clip" if family == "sd1" else "open_clip")
    assert info["short_hash"] == hashlib.sha256(out.read_bytes()).hexdigest()[:10]
    modules = build_modules(tiny_config(load_config(family)))
    assert info["parameters"] == {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def test_seed_changes_weights_and_is_deterministic(tmp_path):
    paths = [tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.safetensors")]
    for path, seed in zip(paths, ("0", "0", "1")):
        assert main(["make-tiny-model", str(path), "--seed", seed]) == 0
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] != data[2]


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["make-tiny-model", str(tmp_path / "x.bin")]) == 1
    assert "x.bin" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()
    (tmp_path / "dir.safetensors").mkdir()
    assert main(["make-tiny-model", str(tmp_path / "dir.safetensors")]) == 1
    assert "dir.safetensors: is a folder" in capsys.readouterr().err
