"""The real diffusion path: latents from the tiny model's VAE, noise, ``adapter.predict``, eps/v targets.

A minimal method trains only the UNet's output layer (as a DreamBooth-style method trains UNet weights
reached through ``adapter.predict``); the held-out denoising loss at fixed noise and timesteps must fall
clearly, for an eps and a v-prediction model."""
from __future__ import annotations

import pytest
import torch

from extensions_lib.train.batches import build_training_data
from extensions_lib.train.diffusion_loss import denoising_loss
from extensions_lib.train.loop import train
from extensions_lib.train.options import TrainingOptions
from train_fakes import OutputLayerMethod, make_folder


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_loss_falls_through_adapter_predict(tmp_path, tiny_model, family):
    model = tiny_model(family)
    assert model.prediction_type == ("v" if family == "sd2-v" else "eps")
    folder = make_folder(tmp_path / "data", 4)
    options = TrainingOptions(data_root=str(folder), template_file="filewords", training_width=64,
                              training_height=64, seed=0, steps=25, learn_rate="0.05", batch_size=2,
                              log_directory=str(tmp_path / "logs"), save_every=0, create_image_every=0,
                              write_csv_every=0, use_weight=True)
    data = build_training_data(model, options, name="", require_name=False)
    method = OutputLayerMethod(data, model)
    latents = torch.stack([data.latents.latents(i) for i in range(4)])
    assert latents.shape == (4, 4, 8, 8)

    def held_out():
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            return sum(float(denoising_loss(model, latents, method.cond.expand(4, -1, -1), generator=g))
                       for _ in range(6)) / 6

    original = method.state_dict()
    try:
        method.layer.requires_grad_(True)
        before = held_out()
        result = train(method, options)
        after = held_out()
    finally:
        method.load_state_dict(original)
        method.layer.requires_grad_(False)
    assert result.step == 25
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, original[k]) for k, v in model.unet.conv_out.state_dict().items())
