"""Samplers, denoiser and txt2img: checked against diffusers' schedulers and closed-form cases."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.sampling import schedule
from extensions_lib.sampling.ddim import sample_ddim
from extensions_lib.sampling.denoiser import Denoiser, guided
from extensions_lib.sampling.euler import sample_euler, sample_euler_ancestral
from extensions_lib.sampling.infotext import infotext, save_png
from extensions_lib.sampling.samplers import find_sampler
from extensions_lib.sampling.txt2img import ImageNoise, generate


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's training schedule (scaled_linear 0.00085..0.012), computed in float64 like the checkpoints."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class FakeAdapter:
    """Just enough ModelAdapter for the sampling code: a smooth, cond- and t-dependent "UNet"."""

    family, context_dim, checkpoint_name, checkpoint_hash = "sd1", 8, "fake-model", "0123456789"
    device, dtype, vae_scale_factor = torch.device("cpu"), torch.float32, 0.18215

    def __init__(self, prediction_type: str = "eps"):
        self.prediction_type = prediction_type
        self.alphas_cumprod = sd_alphas_cumprod()
        self.calls: list[torch.Tensor] = []

    def unet(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c = cond.float().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(0.7 * x + 0.3 * torch.sin(t / 97.0) + c) + 0.1 * x.roll(1, dims=1)

    def predict(self, x, t, cond):
        self.calls.append(torch.as_tensor(t).clone())
        return self.unet(x, t, cond)

    def modules(self):
        return {"unet": torch.nn.Identity(), "text_encoder": torch.nn.Identity()}

    def use(self, *parts):
        return contextlib.nullcontext()

    def decode_latents(self, latents):
        return torch.tanh(latents[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)


def fake_encode(adapter, prompts, clip_skip=1):
    """Deterministic stand-in for prompt encoding: a per-prompt constant of 77 tokens."""
    return torch.stack([torch.full((77, 8), (sum(map(ord, p)) % 97) / 97.0 + 0.1 * clip_skip) for p in prompts])


# --------------------------------------------------------------------------------- schedule

def test_linspace_sigmas_are_log_interpolated_schedule():
    ac = sd_alphas_cumprod()
    sigmas = schedule.linspace_sigmas(ac, 7)
    # Independent: numpy's piecewise-linear interpolation of log-sigma at evenly spaced timesteps.
    log_sigmas = np.log(np.sqrt((1 - ac.double().numpy()) / ac.double().numpy()))
    expected = np.exp(np.interp(np.linspace(999, 0, 7), np.arange(1000), log_sigmas))
    assert len(sigmas) == 8 and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-5)


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma():
    from diffusers import EulerDiscreteScheduler

    ac = sd_alphas_cumprod()
    log_sigmas = schedule.sigmas_from_alphas_cumprod(ac).log()
    t = torch.rand(50, generator=torch.Generator().manual_seed(0)) * 999
    sigma = schedule.t_to_sigma(t, log_sigmas)
    torch.testing.assert_close(schedule.sigma_to_t(sigma, log_sigmas), t, atol=2e-3, rtol=0)
    theirs = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    their_t = theirs._sigma_to_t(sigma.double().numpy(), log_sigmas.double().numpy())
    np.testing.assert_allclose(schedule.sigma_to_t(sigma, log_sigmas).numpy(), their_t, atol=2e-3)


def test_ddim_timesteps_are_diffusers_leading_with_offset():
    from diffusers import DDIMScheduler

    for steps in (10, 20, 30, 50):
        theirs = DDIMScheduler(steps_offset=1, timestep_spacing="leading")
        theirs.set_timesteps(steps)
        assert schedule.ddim_timesteps(1000, steps).tolist() == theirs.timesteps.tolist()


# --------------------------------------------------------------------------------- samplers vs diffusers

@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_euler_with_denoiser_matches_diffusers_euler_discrete(prediction_type):
    from diffusers import EulerDiscreteScheduler

    adapter, steps = FakeAdapter(prediction_type), 12
    cond = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1)) * 0.1
    x_start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = schedule.linspace_sigmas(adapter.alphas_cumprod, steps)

    ours = sample_euler(lambda x, s: Denoiser(adapter)(x, s, cond), x_start * sigmas[0], sigmas)

    theirs = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction_type])
    theirs.set_timesteps(sigmas=sigmas.tolist())
    x = x_start * sigmas[0]
    for t in theirs.timesteps:
        out = adapter.unet(theirs.scale_model_input(x, t), t, cond)
        x = theirs.step(out, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim_scheduler(eta):
    from diffusers import DDIMScheduler

    adapter, steps = FakeAdapter("eps"), 10
    cond = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(3)) * 0.1
    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    step_noise = list(torch.randn(steps, 2, 4, 8, 8, generator=torch.Generator().manual_seed(5)))

    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                           set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    theirs.set_timesteps(steps)
    expected = x_vp
    for t, z in zip(theirs.timesteps, step_noise):
        expected = theirs.step(adapter.unet(expected, t, cond), t, expected, eta=eta, variance_noise=z).prev_sample

    sigmas = schedule.ddim_sigmas(adapter.alphas_cumprod, steps)
    noise = iter(step_noise)
    x_ve = x_vp * (1 + sigmas[0] ** 2) ** 0.5  # the VP start latent, seen in sigma space
    ours = sample_ddim(lambda x, s: Denoiser(adapter)(x, s, cond), x_ve, sigmas, eta=eta,
                       noise_fn=lambda x: next(noise))
    # Timesteps the UNet saw: DDIM's integer ones, recovered from sigma.
    seen = torch.stack([t.reshape(-1)[0] for t in adapter.calls])
    torch.testing.assert_close(seen, theirs.timesteps.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # final sigma 0: VP == sigma space


# --------------------------------------------------------------------------------- closed forms

@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim"])
def test_exact_denoiser_recovers_x0(name):
    spec = find_sampler(name)
    x0 = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    sigmas = spec.schedule(sd_alphas_cumprod(), 9)
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)) * sigmas[0]
    extra = {"noise_fn": torch.randn_like} if spec.stochastic else {}
    out = spec.sample(lambda x, s: x0.expand_as(x), x + x0, sigmas, **extra)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def gaussian_denoiser(scale: float):
    """Optimal denoiser for data ~ N(0, scale**2): E[x0 | x] = x * scale**2 / (scale**2 + sigma**2)."""
    return lambda x, sigma: x * scale**2 / (scale**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_euler_converges_to_the_exact_ode_solution():
    # For Gaussian data the probability-flow ODE is solvable: x(sigma) is proportional to sqrt(s^2 + sigma^2).
    scale, sigma_max = 0.5, 14.0
    x_start = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * sigma_max
    exact = x_start * scale / math.sqrt(scale**2 + sigma_max**2)
    errors = []
    for steps in (50, 100, 200):
        sigmas = schedule.append_zero(torch.logspace(math.log10(sigma_max), -2, steps, dtype=torch.float64))
        errors.append((sample_euler(gaussian_denoiser(scale), x_start, sigmas) - exact).abs().max().item())
    assert errors[-1] < 0.02 * exact.abs().max().item()
    # First-order method: halving the step size halves the error.
    assert 1.6 < errors[0] / errors[1] < 2.4 and 1.6 < errors[1] / errors[2] < 2.4


def test_ddim_eta0_is_the_euler_step():
    # Deterministic DDIM and Euler integrate the same ODE step in sigma space (two different formulas).
    sigmas = schedule.ddim_sigmas(sd_alphas_cumprod(), 15)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(9)) * sigmas[0]
    model = gaussian_denoiser(0.8)
    torch.testing.assert_close(sample_ddim(model, x, sigmas), sample_euler(model, x, sigmas), atol=1e-5, rtol=1e-5)


def test_euler_ancestral_converges_to_the_gaussian_marginal():
    # With the exact denoiser of N(0, s^2) data, ancestral sampling's result tends to variance s^2 as
    # steps grow (first order); without the right fresh noise it would collapse towards 0.
    scale, errors = 0.5, []
    for steps in (30, 100, 300):
        sigmas = schedule.linspace_sigmas(sd_alphas_cumprod(), steps)
        gen = torch.Generator().manual_seed(10)
        x = torch.randn(1, 4, 64, 64, generator=gen) * (sigmas[0] ** 2 + scale**2) ** 0.5
        out = sample_euler_ancestral(gaussian_denoiser(scale), x, sigmas,
                                     noise_fn=lambda x: torch.randn(x.shape, generator=gen))
        errors.append(abs(out.std().item() - scale))
    assert errors[2] < 0.02 and errors[0] > 1.8 * errors[1] > 3.2 * errors[2]


# --------------------------------------------------------------------------------- denoiser

@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_denoiser_turns_the_true_prediction_into_x0(prediction_type):
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(11))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(12))
    timesteps = torch.tensor([10, 500, 999])

    class Oracle(FakeAdapter):
        def predict(self, x, t, cond):
            # The model input must be the training-time (VP) noisy latent at timestep t.
            torch.testing.assert_close(t, timesteps.float(), atol=1e-3, rtol=0)
            torch.testing.assert_close(x, ddpm.add_noise(x0, noise, timesteps), atol=1e-5, rtol=1e-5)
            return noise if self.prediction_type == "eps" else ddpm.get_velocity(x0, noise, timesteps)

    adapter = Oracle(prediction_type)
    sigma = schedule.sigmas_from_alphas_cumprod(adapter.alphas_cumprod)[timesteps]
    denoised = Denoiser(adapter)(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma, torch.zeros(3, 77, 8))
    torch.testing.assert_close(denoised, x0, atol=1e-4, rtol=1e-4)


def test_guidance_combines_cond_and_uncond_and_handles_unequal_lengths():
    adapter = FakeAdapter()
    den = Denoiser(adapter)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(13))
    sigma = torch.tensor([3.0, 3.0])
    cond = torch.full((2, 77, 8), 0.3)
    for uncond in (torch.full((2, 77, 8), -0.2), torch.full((2, 154, 8), -0.2)):
        expected = den(x, sigma, uncond) + (den(x, sigma, cond) - den(x, sigma, uncond)) * 7.5
        torch.testing.assert_close(guided(den, cond, uncond, 7.5)(x, sigma), expected, atol=1e-5, rtol=1e-5)
    adapter.calls.clear()
    torch.testing.assert_close(guided(den, cond, -cond, 1.0)(x, sigma), den(x, sigma, cond))
    assert len(adapter.calls) == 2  # cfg 1: no unconditional pass


# --------------------------------------------------------------------------------- txt2img

def test_image_noise_is_per_image_seeded_cpu_noise():
    noise = ImageNoise([5, 6], (4, 3, 3))
    first, second = noise(), noise()
    for row, seed in enumerate([5, 6]):
        g = torch.Generator("cpu").manual_seed(seed)
        assert torch.equal(first[row], torch.randn((4, 3, 3), generator=g))
        assert torch.equal(second[row], torch.randn((4, 3, 3), generator=g))


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim"])
def test_generate_is_deterministic_per_seed(sampler):
    kw = dict(negative="blurry", steps=4, width=32, height=24, sampler=sampler, encode_fn=fake_encode)
    a = generate(FakeAdapter(), "a cat", seed=42, batch_size=2, **kw)
    b = generate(FakeAdapter(), "a cat", seed=42, batch_size=2, **kw)
    assert [im.size for im in a] == [(32, 24), (32, 24)]
    assert [_png_bytes(im) for im in a] == [_png_bytes(im) for im in b]
    assert _png_bytes(generate(FakeAdapter(), "a cat", seed=43, **kw)[0]) != _png_bytes(a[0])
    # The second image of a batch is the image its own seed (42 + 1) gives alone, as in the WebUI.
    assert _png_bytes(generate(FakeAdapter(), "a cat", seed=43, **kw)[0]) == _png_bytes(a[1])
    assert "Seed: 43," in a[1].info["parameters"]


def test_generate_callback_and_infotext():
    seen = []
    (image,) = generate(FakeAdapter(), "a photo, of: cat", negative="ugly", steps=3, cfg_scale=7.0, seed=7,
                        width=16, height=16, sampler="Euler a", clip_skip=2, encode_fn=fake_encode,
                        callback=lambda d: seen.append(d["i"]), extra_params={"Hypernet": "my-hn"})
    assert seen == [0, 1, 2]
    assert image.info["parameters"] == (
        "a photo, of: cat\nNegative prompt: ugly\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 16x16, "
        "Model hash: 0123456789, Model: fake-model, Clip skip: 2, RNG: CPU, Hypernet: my-hn")


def test_infotext_quotes_like_the_webui():
    text = infotext("p", "", {"Steps": 20, "CFG scale": "7.5", "Model": "a, b", "Skip": None})
    assert text == 'p\nSteps: 20, CFG scale: 7.5, Model: "a, b"'


def test_save_png_writes_parameters_chunk_atomically(tmp_path):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    image.info["parameters"] = "cat\nSteps: 1"
    save_png(image, tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as reread:
        assert reread.text["parameters"] == "cat\nSteps: 1"
        assert np.array_equal(np.asarray(reread), np.asarray(image))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    save_png(image, tmp_path / "out.png", extra_text={"alchemy_source_note": "own photos, ünïcode"})
    with Image.open(tmp_path / "out.png") as reread:
        assert reread.text == {"parameters": "cat\nSteps: 1", "alchemy_source_note": "own photos, ünïcode"}


@pytest.mark.parametrize("bad, message", [(dict(width=100), "width"), (dict(steps=0), "steps"),
                                          (dict(sampler="plms"), "sampler")])
def test_generate_rejects_bad_options(bad, message):
    kw = dict(steps=2, width=16, height=16, encode_fn=fake_encode) | bad
    with pytest.raises(AlchemyError, match=message):
        generate(FakeAdapter(), "x", **kw)


# --------------------------------------------------------------------------------- tiny real model

def _diffusers_latents(model, scheduler, cond, uncond, noise, sigmas=None, steps=None):
    """The same denoising run through diffusers' own StableDiffusionPipeline loop (eps-space CFG)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=None, unet=model.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = noise.shape[-1] * 8
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.0, latents=noise,
                height=size, width=size, output_type="latent", sigmas=sigmas,
                num_inference_steps=steps).images


@pytest.mark.parametrize("family, sampler", [("sd1", "euler"), ("sd2-v", "euler"), ("sd1", "ddim"), ("sd2-v", "ddim")])
def test_sampling_on_tiny_model_matches_diffusers_pipeline(tiny_model, family, sampler):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from extensions_lib.prompt import encode_prompts
    from extensions_lib.sampling.txt2img import sample_latents

    model, steps = tiny_model(family), 4
    prediction = {"eps": "epsilon", "v": "v_prediction"}[model.prediction_type]
    schedule_kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    with torch.no_grad():
        cond = encode_prompts(model, ["a photo of a cat"]).expand(2, -1, -1)
        uncond = encode_prompts(model, ["blurry"]).expand(2, -1, -1)
        ours = sample_latents(model, find_sampler(sampler), cond, uncond, ImageNoise([3, 4], (4, 8, 8)), steps, 7.0)
        noise = ImageNoise([3, 4], (4, 8, 8))()
        if sampler == "euler":
            sigmas = schedule.linspace_sigmas(model.alphas_cumprod, steps).tolist()
            theirs = _diffusers_latents(model, EulerDiscreteScheduler(timestep_spacing="linspace", steps_offset=1,
                                                                               **schedule_kw),
                                        cond, uncond, noise, sigmas=sigmas)
        else:
            scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=1, **schedule_kw)
            theirs = _diffusers_latents(model, scheduler, cond, uncond, noise, steps=steps)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_generate_on_tiny_model_is_deterministic(tiny_model, family):
    model = tiny_model(family)
    kw = dict(negative="blurry", steps=3, width=64, height=48, sampler="euler_a")
    first = generate(model, "a photo of a cat", seed=123, **kw)[0]
    again = generate(model, "a photo of a cat", seed=123, **kw)[0]
    other = generate(model, "a photo of a cat", seed=124, **kw)[0]
    assert first.size == (64, 48) and np.asarray(first).std() > 1
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert f"Model hash: {model.checkpoint_hash}, Model: {model.checkpoint_name}," in first.info["parameters"]


def test_txt2img_cli_writes_png_with_parameters(tiny_checkpoint, tiny_model, tmp_path):
    from extensions_lib.cli import main

    out = tmp_path / "cat.png"
    args = ["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--prompt", "a cat", "--negative", "dog",
            "--steps", "2", "--cfg", "5.5", "--seed", "9", "--width", "64", "--height", "64", "--sampler", "ddim",
            "--clip-skip", "2", "--out", str(out)]
    assert main(args) == 0
    expected = generate(tiny_model("sd1"), "a cat", negative="dog", steps=2, cfg_scale=5.5, seed=9, width=64,
                        height=64, sampler="ddim", clip_skip=2)[0]
    with Image.open(out) as image:
        assert image.text["parameters"] == expected.info["parameters"]
        assert "Sampler: DDIM, CFG scale: 5.5, Seed: 9, Size: 64x64" in image.text["parameters"]
        assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("bad, message", [(["--out", "x.jpg"], "x.jpg"), (["--width", "60"], "width"),
                                          (["--sampler", "plms"], "sampler")])
def test_txt2img_cli_errors_name_the_problem_and_write_nothing(tiny_checkpoint, tmp_path, capsys, bad, message):
    from extensions_lib.cli import main

    args = ["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--prompt", "x", "--steps", "1",
            "--out", str(tmp_path / "o.png"), *bad]
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_with_a_bfloat16_model_stays_close_to_float32(tiny_checkpoint, tiny_model):
    # Exercises the dtype hand-offs (cond, UNet input, VAE input) that a half-precision GPU model needs.
    from extensions_lib.backend.standalone import load_model

    kw = dict(steps=3, seed=1, width=64, height=64)
    full = np.asarray(generate(tiny_model("sd1"), "a cat", **kw)[0]).astype(int)
    half = np.asarray(generate(load_model(tiny_checkpoint("sd1"), dtype=torch.bfloat16), "a cat", **kw)[0]).astype(int)
    assert np.abs(full - half).mean() < 3
