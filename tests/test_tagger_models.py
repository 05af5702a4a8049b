"""Model folders, known models, offline-safe download, providers, and the `alchemy tag` command."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from extensions_lib import cli
from extensions_lib.errors import AlchemyError
from extensions_lib.tagger import models as tm
from extensions_lib.tagger.providers import CPU, CUDA, check_session, plan_providers
from tagger_models import make_deepdanbooru_checkpoint, make_wd14_folder, random_image


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_wd14_folder(root / "my-wd14")
    make_deepdanbooru_checkpoint(root / "deepdanbooru", fmt="safetensors")
    (root / "empty").mkdir()
    return root


def test_folders_are_found_and_told_apart(models_dir):
    assert tm.list_models(models_dir) == {"deepdanbooru": models_dir / "deepdanbooru",
                                          "my-wd14": models_dir / "my-wd14"}
    assert tm.model_kind(models_dir / "my-wd14") == "wd14"
    assert tm.model_kind(models_dir / "deepdanbooru") == "deepdanbooru"
    assert tm.model_kind(models_dir / "empty") is None


def test_resolve_by_path_by_name_and_errors(models_dir, tmp_path):
    assert tm.resolve_model(str(models_dir / "my-wd14")) == models_dir / "my-wd14"
    assert tm.resolve_model("my-wd14", models_dir) == models_dir / "my-wd14"
    with pytest.raises(AlchemyError) as err:
        tm.resolve_model("wd-swinv2-tagger-v3", models_dir)
    msg = err.value.message
    assert str(models_dir / "wd-swinv2-tagger-v3") in msg and "model.onnx" in msg and "627aef9563" in msg
    with pytest.raises(AlchemyError, match="not a tagger model"):
        tm.resolve_model(str(models_dir / "empty"))


def test_known_models_are_pinned_to_commits():
    assert len(tm.KNOWN_MODELS) >= 10
    for m in tm.KNOWN_MODELS.values():
        assert len(m.revision) == 40 and int(m.revision, 16) >= 0
        assert m.repo_id.startswith("SmilingWolf/")


def test_download_fails_fast_offline_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(AlchemyError) as err:
        tm.resolve_model("wd-vit-tagger-v3", tmp_path, download=True)
    assert time.perf_counter() - started < 1.0
    assert "HF_HUB_OFFLINE" in err.value.message and str(tmp_path / "wd-vit-tagger-v3") in err.value.message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(AlchemyError, match="cannot be reached") as err:
        tm.download_known_model("wd-vit-tagger-v3", tmp_path, reachable=lambda: False)
    assert "selected_tags.csv" in err.value.message
    assert not (tmp_path / "wd-vit-tagger-v3").exists()


def test_reachability_probe_gives_up_within_its_timeout(monkeypatch):
    def hanging_connect(*args, **kwargs):  # a DNS lookup that never answers ignores socket timeouts
        time.sleep(5)
        raise OSError("late")

    monkeypatch.setattr(tm.socket, "create_connection", hanging_connect)
    started = time.perf_counter()
    assert tm.hub_reachable(timeout=0.3) is False
    assert time.perf_counter() - started < 1.0


def test_provider_plan_messages():
    cpu_only = plan_providers("auto", available=[CPU], installed={"onnxruntime": "1.26.0"})
    assert cpu_only.providers == [CPU] and not cpu_only.uses_cuda
    assert any("running on CPU" in n for n in cpu_only.notes)
    gpu = plan_providers("auto", 1, available=[CUDA, CPU], installed={"onnxruntime-gpu": "1.20.0"})
    assert gpu.uses_cuda and gpu.providers[0][1]["device_id"] == 1 and gpu.providers[-1] == CPU and not gpu.notes
    both = plan_providers("auto", available=[CPU], installed={"onnxruntime": "1.19.0", "onnxruntime-gpu": "1.19.0"})
    assert any("both onnxruntime 1.19.0 and onnxruntime-gpu 1.19.0" in n and "pip uninstall -y onnxruntime "
               "onnxruntime-gpu" in n for n in both.notes)
    asked = plan_providers("cuda", available=[CPU], installed={"onnxruntime": "1.26.0"})
    assert asked.providers == [CPU] and "CUDA was requested" in asked.notes[0]
    assert plan_providers("cpu", available=[CUDA, CPU], installed={}).providers == [CPU]

    class Session:
        def get_providers(self):
            return [CPU]
    assert "failed to start" in check_session(Session(), gpu)[0]
    assert check_session(Session(), cpu_only) == []


def test_cli_tag_end_to_end(models_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        random_image(rng, 30 + 10 * i, 40).save(data / f"{i}.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    argv = ["tag", str(data), "--model", "my-wd14", "--models-dir", str(models_dir), "--cache-dir",
            str(tmp_path / "cache"), "--general-threshold", "0.5", "--rating", "first", "--trigger-tags", "sks",
            "--manifest", str(tmp_path / "m.jsonl")]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    texts = [(data / f"{i}.txt").read_text(encoding="utf-8") for i in range(5)]
    assert all(t.startswith("sks, ") for t in texts)
    assert "5 captions written" in out.out and "broken.jpg" in out.out and "most frequent tags: sks (5)" in out.out
    assert "running on CPU" in out.err
    assert len((tmp_path / "m.jsonl").read_text(encoding="utf-8").splitlines()) == 6


def test_cli_errors_are_one_line_with_the_fix(models_dir, tmp_path, capsys):
    assert cli.main(["tag", str(tmp_path), "--model", "nope", "--models-dir", str(models_dir)]) == 1
    err = capsys.readouterr().err
    assert "alchemy: error:" in err and str(models_dir / "nope") in err and "my-wd14" in err
    assert cli.main(["tag", str(tmp_path), "--model", "wd-vit-tagger-v3", "--models-dir", str(tmp_path),
                     "--download"]) == 1  # conftest sets HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY",
              "no_proxy", "HF_ENDPOINT")


def test_probe_goes_where_the_download_would(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    assert tm.hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example:8443")  # a mirror user is not offline
    assert tm.hub_address() == ("hf-mirror.example", 8443)
    monkeypatch.setenv("https_proxy", "http://proxy.local:3128")  # nor is a user behind a proxy
    assert tm.hub_address() == ("proxy.local", 3128)
    monkeypatch.setenv("no_proxy", "hf-mirror.example")
    assert tm.hub_address() == ("hf-mirror.example", 8443)

    seen = []

    def connect(address, timeout=None):
        seen.append(address)
        raise OSError("refused")

    monkeypatch.setattr(tm.socket, "create_connection", connect)
    assert tm.hub_reachable(timeout=0.5) is False and seen == [("hf-mirror.example", 8443)]


def test_download_writes_real_files_at_the_pin_and_checks_the_checksum(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, *, revision, local_dir, **kwargs):
        calls.append((repo_id, filename, revision, kwargs.get("local_dir_use_symlinks")))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx bytes" if filename == "model.onnx" else b"tag_id,name,category,count\n")
        return str(path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    key = "wd-vit-tagger-v3"
    with pytest.raises(AlchemyError, match="checksum") as err:  # the pinned sha256 is the real model's
        tm.download_known_model(key, tmp_path, reachable=lambda: True)
    assert str(tmp_path / key) in err.value.message and not (tmp_path / key / "model.onnx").exists()

    pinned = dataclasses.replace(tm.KNOWN_MODELS[key], onnx_sha256=hashlib.sha256(b"onnx bytes").hexdigest())
    monkeypatch.setitem(tm.KNOWN_MODELS, key, pinned)
    assert tm.download_known_model(key, tmp_path, reachable=lambda: True) == tmp_path / key
    onnx = tmp_path / key / "model.onnx"
    assert onnx.read_bytes() == b"onnx bytes" and not onnx.is_symlink()
    assert {c[2] for c in calls} == {pinned.revision} and {c[1] for c in calls} == {"model.onnx", "selected_tags.csv"}

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("reset")))
    with pytest.raises(AlchemyError, match="download of SmilingWolf/wd-vit-tagger-v3 failed") as err:
        tm.download_known_model(key, tmp_path / "again", reachable=lambda: True)
    assert "selected_tags.csv" in err.value.message


def test_old_huggingface_hub_is_asked_for_real_files_not_cache_symlinks():
    assert tm._real_files_kwargs("0.20.3") == {"local_dir_use_symlinks": False}
    assert tm._real_files_kwargs("0.22.2") == {"local_dir_use_symlinks": False}
    assert tm._real_files_kwargs("0.23.0") == {} and tm._real_files_kwargs("0.36.2") == {}
    assert tm._real_files_kwargs("1.0.0rc1") == {} and tm._real_files_kwargs("dev") == {}


def test_cli_bad_regex_is_one_error_before_the_model_loads(models_dir, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")  # never read: the options are refused first
    assert cli.main(["tag", str(tmp_path), "--model", "my-wd14", "--models-dir", str(models_dir),
                     "--exclude", "/([/"]) == 1
    err = capsys.readouterr().err
    assert "alchemy: error: bad regular expression" in err and "fix the /regex/" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "a.png"]
