"""Denoising helpers agree with diffusers' scheduler arithmetic and with plain re-computations."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from extensions_lib.train import diffusion_loss as dl
from train_fakes import FakeAdapter, scaled_linear_alphas_cumprod


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_alphas_cumprod_fixture_matches_diffusers(scheduler):
    assert torch.allclose(scaled_linear_alphas_cumprod(), scheduler.alphas_cumprod.float(), atol=1e-6)


def test_add_noise_and_velocity_match_diffusers(scheduler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 999])
    ac = scheduler.alphas_cumprod.float()
    assert torch.allclose(dl.add_noise(x0, noise, t, ac), scheduler.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(dl.velocity(x0, noise, t, ac), scheduler.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.equal(dl.target("eps", x0, noise, t, ac), noise)
    assert torch.equal(dl.target("v", x0, noise, t, ac), dl.velocity(x0, noise, t, ac))
    with pytest.raises(ValueError):
        dl.target("sample", x0, noise, t, ac)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    ac = scaled_linear_alphas_cumprod().double()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g).double(), torch.randn(4, 4, 8, 8, generator=g).double()
    t = torch.tensor([3, 100, 600, 990])
    x_t = dl.add_noise(x0, noise, t, ac)
    model_out = noise if prediction_type == "eps" else dl.velocity(x0, noise, t, ac)
    assert torch.allclose(dl.predicted_x0(x_t, model_out, t, ac, prediction_type), x0.float(), atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_min_snr_weights_as_in_the_paper(scheduler, prediction_type):
    t = torch.arange(0, 1000, 37)
    ac = scheduler.alphas_cumprod
    alpha, sigma = ac[t].sqrt(), (1 - ac[t]).sqrt()
    snr = (alpha / sigma) ** 2  # diffusers' compute_snr
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction_type == "v" else snr)
    got = dl.min_snr_weights(t, ac.float(), 5.0, prediction_type)
    assert torch.allclose(got, expected.float(), rtol=1e-5)
    assert float(got.max()) <= 1.0 + 1e-6


def test_weighted_mse_per_sample():
    pred, tgt = torch.zeros(2, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    weight = torch.tensor([[[[0.0, 0.0], [2.0, 2.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    assert torch.allclose(dl.per_sample_mse(pred, tgt), torch.tensor([30 / 4, 4 / 4]))
    assert torch.allclose(dl.per_sample_mse(pred, tgt, weight), torch.tensor([(18 + 32) / 4, 4 / 4]))


def test_offset_noise_is_constant_per_channel():
    like = torch.zeros(3, 4, 8, 8)
    base = dl.sample_noise(like, torch.Generator().manual_seed(5))
    offset = dl.sample_noise(like, torch.Generator().manual_seed(5), offset=0.1)
    shift = offset - base
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert float(shift.abs().max()) > 0


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_denoising_loss_equals_a_hand_computation(gamma):
    adapter = FakeAdapter()
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(3))
    weight = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    loss = dl.denoising_loss(adapter, latents, cond, generator=torch.Generator().manual_seed(9), weight=weight,
                             min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    a = adapter.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    per = (weight * (adapter.predict(noisy, t, cond) - noise) ** 2).mean(dim=(1, 2, 3))
    if gamma:
        snr = a.flatten() / (1 - a.flatten())
        per = per * torch.clamp(snr, max=gamma) / snr
    assert torch.allclose(loss, per.mean(), rtol=1e-6)
