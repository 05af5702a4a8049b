"""The latent cache encodes each image once and samples as the WebUI's three methods say."""
from __future__ import annotations

import math

import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.train.dataset import scan_folder
from extensions_lib.train.latent_cache import LatentCache, image_generator
from train_fakes import FakeAdapter, make_folder, write_image


@pytest.fixture()
def dataset(tmp_path):
    make_folder(tmp_path, 3)
    write_image(tmp_path / "wide.png", size=(128, 64), seed=9)
    write_image(tmp_path / "wide2.png", size=(130, 60), seed=10)
    return scan_folder(tmp_path, width=64, height=64, varsize=True)


def expected_mean(ds, i, scale):
    """What the fake VAE's mean is, computed from the image directly."""
    pixels, _ = ds.load(i)
    pooled = torch.nn.functional.avg_pool2d(pixels[None], 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)[0] * scale


@pytest.mark.parametrize("method", ["once", "deterministic", "random"])
def test_each_image_is_encoded_once_in_batches_by_size(dataset, method):
    adapter = FakeAdapter()
    cache = LatentCache(dataset, adapter, method=method, seed=1, encode_batch=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # five "epochs" of use
        for i in range(len(dataset)):
            cache.latents(i, g)
    assert adapter.encoded_images == len(dataset) == 5
    assert adapter.encode_calls == math.ceil(3 / 2) + math.ceil(2 / 2)  # sizes 64x64 (3) and 128x64 (2)


def test_once_reuses_one_sample_per_image(dataset):
    adapter = FakeAdapter(std=0.2)
    cache = LatentCache(dataset, adapter, method="once", seed=7)
    for i in range(len(dataset)):
        mean = expected_mean(dataset, i, adapter.vae_scale_factor)
        noise = torch.randn(mean.shape, generator=image_generator(7, i))
        expected = mean + 0.2 * adapter.vae_scale_factor * noise
        assert torch.allclose(cache.latents(i), expected, atol=1e-6)
        assert torch.equal(cache.latents(i), cache.latents(i))
    # the sample of an image depends on the seed and the image, not on how images were batched
    other = LatentCache(dataset, FakeAdapter(std=0.2), method="once", seed=7, encode_batch=1)
    assert all(torch.equal(other.latents(i), cache.latents(i)) for i in range(len(dataset)))


def test_deterministic_is_the_mean(dataset):
    adapter = FakeAdapter(std=0.5)
    cache = LatentCache(dataset, adapter, method="deterministic")
    for i in range(len(dataset)):
        assert torch.allclose(cache.latents(i), expected_mean(dataset, i, adapter.vae_scale_factor), atol=1e-6)


def test_random_draws_anew_each_time(dataset):
    adapter = FakeAdapter(std=0.3)
    cache = LatentCache(dataset, adapter, method="random")
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([cache.latents(0, g) for _ in range(4000)])
    assert not torch.equal(draws[0], draws[1])
    mean = expected_mean(dataset, 0, adapter.vae_scale_factor)
    assert torch.allclose(draws.mean(0), mean, atol=0.02)
    assert torch.allclose(draws.std(0), torch.full_like(mean, 0.3 * adapter.vae_scale_factor), atol=0.02)
    again = LatentCache(dataset, FakeAdapter(std=0.3), method="random")
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(cache.latents(2, g1), again.latents(2, g2))


def test_weights_only_with_use_weight(dataset):
    assert LatentCache(dataset, FakeAdapter()).weight(0) is None
    w = LatentCache(dataset, FakeAdapter(), use_weight=True).weight(3)
    assert torch.equal(w, torch.ones(4, 8, 16))  # no alpha: all ones at the latent size


def test_unknown_method_is_named(dataset):
    with pytest.raises(AlchemyError, match="latent_sampling_method"):
        LatentCache(dataset, FakeAdapter(), method="sometimes")
