"""During the DreamBooth steps the VAE (latents cached) and the frozen text encoder (prompt encodings
cached) are out of memory; they come back for saving and afterwards bit for bit, and the training is the
same as with them in place."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from extensions_lib.backend.standalone import load_model
from extensions_lib.dreambooth.method import train_dreambooth
from extensions_lib.dreambooth.options import DreamBoothTrainOptions
from train_fakes import make_folder


def _options(tmp_path, **kw) -> DreamBoothTrainOptions:
    base = dict(model_name="subj", data_root=str(tmp_path / "inst"), instance_prompt="a photo of sks thing, [filewords]",
                class_prompt="a photo of thing", class_dir=str(tmp_path / "cls"), num_class_images=2, class_steps=2,
                training_width=64, training_height=64, seed=2, steps=2, learn_rate="1e-2", batch_size=1,
                log_directory=str(tmp_path / "logs"), checkpoints_dir=str(tmp_path / "ckpt"),
                lora_dir=str(tmp_path / "Lora"), save_every=0, create_image_every=0, write_csv_every=0,
                mode="lora", save_resume_state=False)
    base.update(kw)
    if not (tmp_path / "inst").is_dir():
        make_folder(tmp_path / "inst", 2)
    return DreamBoothTrainOptions(**base)


def _present(module) -> bool:
    return all(p.numel() > 0 for p in module.parameters())


def _run(model, options):
    """Train; for each progress report, whether the VAE and the text encoder were in memory."""
    seen = []
    result = train_dreambooth(model, options, callbacks=lambda p: seen.append(
        (_present(model.vae), _present(model.text_encoder))))
    return result, seen


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_vae_and_text_encoder_are_away_during_the_steps_and_training_is_unchanged(tmp_path, tiny_checkpoint, mode):
    ckpt = tiny_checkpoint("sd1")
    kept, away = load_model(ckpt), load_model(ckpt)
    before = {name: _state(m) for name, m in away.modules().items()}
    a, seen_kept = _run(kept, _options(tmp_path / "kept", offload_unused=False, mode=mode))
    b, seen_away = _run(away, _options(tmp_path / "away", mode=mode))
    assert seen_kept and all(s == (True, True) for s in seen_kept)
    assert seen_away and all(s == (False, False) for s in seen_away)
    assert a.losses == b.losses  # the same numbers, bit for bit
    file_a, file_b = load_file(str(a.final_path)), load_file(str(b.final_path))
    assert set(file_a) == set(file_b) and all(torch.equal(file_a[k], file_b[k]) for k in file_a)
    for name in ("vae", "text_encoder"):  # back, bit for bit (and in the full checkpoint, which needs them)
        got = away.modules()[name].state_dict()
        assert all(torch.equal(got[k], v) for k, v in before[name].items())
    if mode == "full":
        assert any(k.startswith("first_stage_model.") for k in file_b)


def test_what_is_read_during_the_steps_stays(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("sd1")
    _, seen = _run(load_model(ckpt), _options(tmp_path / "te", train_text_encoder=True))
    assert seen and all(s == (False, True) for s in seen)  # the text encoder trains
    _, seen = _run(load_model(ckpt), _options(tmp_path / "shuffle", shuffle_tags=True))
    assert seen and all(s == (False, True) for s in seen)  # prompts vary: encoded as they come
    host_moves = load_model(ckpt)
    host_moves.moves_parts = True  # the adapter (or its host) places parts itself: leave placement to it
    _, seen = _run(host_moves, _options(tmp_path / "host"))
    assert seen and all(s == (True, True) for s in seen)
