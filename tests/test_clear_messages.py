"""Options that point at the wrong thing are messages naming it, never tracebacks; a refused resume state
never advises turning the safety check off."""
from __future__ import annotations

import pickle

import pytest
import torch

from extensions_lib.cli import main
from extensions_lib.errors import AlchemyError


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_device_cuda_without_a_gpu_is_a_message(tiny_checkpoint, tmp_path, capsys, device):
    code = main(["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--prompt", "x", "--steps", "1", "--width", "64",
                 "--height", "64", "--device", device, "--out", str(tmp_path / "o.png")])
    err = _error(capsys)
    assert code == 1 and f"device '{device}'" in err and "--device cpu" in err
    assert not (tmp_path / "o.png").exists()


def test_an_unknown_device_is_a_message():
    from extensions_lib.backend.device import resolve_device as checked_device

    with pytest.raises(AlchemyError, match="unknown device 'gpu'"):
        checked_device("gpu")
    assert checked_device("cpu") == torch.device("cpu")


def test_embeddings_dir_pointing_at_a_file_says_so(tiny_checkpoint, tmp_path, capsys):
    a_file = tmp_path / "emb.txt"
    a_file.write_text("x")
    assert main(["embedding", "list", "--embeddings-dir", str(a_file)]) == 1
    assert "--embeddings-dir is not a folder" in _error(capsys)
    code = main(["embedding", "train", "--ckpt", str(tiny_checkpoint("sd1")), "--embedding-name", "x",
                 "--embeddings-dir", str(a_file), "--data-root", str(tmp_path), "--log-directory", str(tmp_path / "l")])
    err = _error(capsys)
    assert code == 1 and "not a folder" in err and "no embedding named" not in err
    code = main(["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--prompt", "x", "--steps", "1", "--width", "64",
                 "--height", "64", "--embeddings-dir", str(a_file), "--out", str(tmp_path / "o.png")])
    assert code == 1 and "--embeddings-dir is not a folder" in _error(capsys)


def test_log_directory_pointing_at_a_file_says_so(tiny_model, tmp_path):
    from extensions_lib.embeddings.session import train_embedding
    from test_embeddings_train import options, setup_run

    adapter = tiny_model("sd1")
    setup_run(adapter, tmp_path, images=1)
    (tmp_path / "logfile").write_text("x")
    for log in (tmp_path / "logfile", tmp_path / "logfile" / "below"):
        with pytest.raises(AlchemyError, match="the log directory is not a folder") as info:
            train_embedding(adapter, options(tmp_path, steps=1, log_directory=str(log)))
        assert str(log) in str(info.value)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("true",))


def test_a_tampered_resume_state_is_refused_without_advising_to_disable_the_check(tmp_path):
    from extensions_lib.train.resume import load_resume_state

    path = tmp_path / "resume_state.pt"
    torch.save({"format": "x", "payload": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(AlchemyError) as info:
        load_resume_state(path)
    message = str(info.value)
    assert "refused" in message and "tampered" in message
    assert "weights_only" not in message and "False" not in message
    path.write_bytes(path.read_bytes()[:100])  # truncated: still no advice to turn the check off
    with pytest.raises(AlchemyError) as info:
        load_resume_state(path)
    assert "weights_only" not in str(info.value)


def test_txt2img_with_a_checkpoint_that_makes_nan_images_exits_non_zero_and_writes_nothing(tiny_checkpoint,
                                                                                          tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_checkpoint("sd1"))
    key = next(k for k in state if k.startswith("first_stage_model.decoder.conv_out.bias"))
    state[key] = torch.full_like(state[key], float("nan"))
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    out = tmp_path / "o.png"
    code = main(["txt2img", "--ckpt", str(broken), "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64",
                 "--out", str(out)])
    err = _error(capsys)
    assert code == 1 and "VAE produced NaN" in err and "no image was written" in err
    assert not out.exists()
    code = main(["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--prompt", "x", "--steps", "1", "--width", "64",
                 "--height", "64", "--out", str(out)])
    assert code == 0 and out.is_file()  # the check passes finite images through


def test_listings_of_a_folder_setting_that_names_a_file_stay_empty_and_lookups_say_why(tmp_path):
    """Listings never fail (the WebUI calls them while generating); asking for a name explains the setting."""
    from extensions_lib.embeddings.library import EmbeddingLibrary
    from extensions_lib.hypernetworks.library import HypernetworkLibrary

    a_file = tmp_path / "folder.txt"
    a_file.write_text("x")
    embeddings, hypernetworks = EmbeddingLibrary(a_file), HypernetworkLibrary(a_file)
    assert embeddings.entries() == [] and hypernetworks.entries() == []
    with pytest.raises(AlchemyError, match="the embeddings folder is not a folder"):
        embeddings.entry("x")
    with pytest.raises(AlchemyError, match="the hypernetworks folder is not a folder"):
        hypernetworks.path("x")
