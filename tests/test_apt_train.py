"""APT training on the tiny models: the pair learns (guided held-out loss falls), the loss is exactly the guided
objective (eps and v, masks, reconstruction), the negative's rate multiplier and per-embedding clipping hold at
every update, runs resume exactly, both files load in the host's reader, and DreamArtist's crash paths (s = 1,
rectangular images, SD2-v) work or are refused clearly before anything is written."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.apt.create import create_pair
from extensions_lib.apt.guided import guided_prediction
from extensions_lib.apt.method import Ema, prepare
from extensions_lib.apt.options import AptCreateOptions, AptTrainOptions
from extensions_lib.apt.session import AptSession, train_apt
from extensions_lib.embeddings.patch import patch_text_encoders
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import read_embedding
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.prompt import encode_prompts
from extensions_lib.train.dataset import to_pixels
from extensions_lib.train.diffusion_loss import add_noise
from extensions_lib.train.resume import resume_options
from host_pt_reference import host_read_pt_embedding
from test_embeddings_train import concept_image, conditioned_model, make_dataset  # noqa: F401 (fixture)

NAME = "zqxthing"
NEG = f"{NAME}-neg"


def options(tmp: Path, **overrides) -> AptTrainOptions:
    values = dict(embedding_name=NAME, embeddings_dir=str(tmp / "emb"), data_root=str(tmp / "data"),
                  template_file=str(tmp / "template.txt"), training_width=64, training_height=64, steps=4, seed=1,
                  save_every=0, create_image_every=0, write_csv_every=0, log_directory=str(tmp / "logs"))
    values.update(overrides)
    return AptTrainOptions(**values)


def setup_run(adapter, tmp: Path, images: int = 3, vectors: tuple[int, int] = (3, 6), init: str = "photo") -> None:
    make_dataset(tmp / "data", images)
    (tmp / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
    create_pair(adapter, AptCreateOptions(name=NAME, init_text=init, init_text_neg=init, seed=0,
                                          num_vectors_per_token=vectors[0], num_vectors_per_token_neg=vectors[1]),
                directory=tmp / "emb")


def guided_heldout_loss(adapter, method, images: list[Image.Image], scale: float = 3.0) -> float:
    """The guided denoising loss of held-out images with the pair, at fixed timesteps and noise."""
    pixels = torch.stack([to_pixels(im, (64, 64)) for im in images])
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad(), patch_text_encoders(adapter):
        latents = adapter.encode_images(pixels).mode()
        cond_neg, cond_pos = (c.expand(len(images), -1, -1) for c in
                              method.conditioning_pair([f"a photo of {NEG}"], [f"a photo of {NAME}"]))
        total, steps = 0.0, [50, 150, 300, 450, 600, 750, 900]
        for t in steps:
            noise = torch.randn(latents.shape, generator=generator)
            t_batch = torch.tensor([t] * len(images))
            noisy = add_noise(latents, noise, t_batch, adapter.alphas_cumprod)
            guided = guided_prediction(adapter, noisy, t_batch, cond_neg, cond_pos, torch.full((len(images),), scale))
            total += float(((guided - noise) ** 2).mean())
    return total / len(steps)


# ---- it learns ---------------------------------------------------------------------------------------------------

def test_the_pair_learns_and_both_files_load_in_the_hosts_reader(conditioned_model, tmp_path):
    model = conditioned_model
    setup_run(model, tmp_path, images=4, vectors=(8, 8))  # "photo" knows nothing of the concept
    opts = options(tmp_path, steps=60, learn_rate="0.3", cfg_scale="2", latent_sampling_method="deterministic",
                   save_every=30)
    method = prepare(model, opts)
    heldout = [concept_image(100 + i) for i in range(3)]
    before = guided_heldout_loss(model, method, heldout, scale=2.0)
    start_neg = method.neg.vectors[""].detach().clone()

    result = train_apt(model, opts, method=method)
    after = guided_heldout_loss(model, method, heldout, scale=2.0)
    assert result.step == 60 and not result.cancelled
    assert after < 0.94 * before, (before, after)
    assert not torch.equal(method.neg.vectors[""], start_neg)  # the negative trained too

    # Control: the positive alone, with the untrained negative, does not reach the trained pair's loss.
    trained_neg = method.neg.vectors[""].detach().clone()
    with torch.no_grad():
        method.neg.vectors[""].copy_(start_neg)
    assert guided_heldout_loss(model, method, heldout, scale=2.0) > after
    with torch.no_grad():
        method.neg.vectors[""].copy_(trained_neg)

    for name, half in ((NAME, method.pos), (NEG, method.neg)):
        path = tmp_path / "emb" / f"{name}.pt"
        assert check_host_loadable(path) == []
        host_name, vec, count, width, step, sd_hash, _ = host_read_pt_embedding(path)
        assert (host_name, count, width, step, sd_hash) == (name, 8, 32, 60, model.checkpoint_hash)
        assert torch.equal(vec, half.vectors[""].detach())
    log = result.log_dir
    for stem in (f"{NAME}-30", f"{NAME}-30-neg", f"{NAME}-60", f"{NAME}-60-neg"):
        assert host_read_pt_embedding(log / "embeddings" / f"{stem}.pt")[0] == stem
    assert read_embedding(log / "embeddings" / f"{NAME}-60-neg.pt").extra["provenance"]["method"] == "apt"


# ---- the loss is the guided objective -----------------------------------------------------------------------------

def independent_loss(adapter, batch, pos_prompts, neg_prompts, scales, weight=None, pixels=None, rec_w=0.0):
    """The objective written out: two text-encoder and two UNet calls, DreamArtist's formulas."""
    gen = torch.Generator().manual_seed(11)
    latents = batch.latents
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    a = adapter.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    e_pos = adapter.predict(noisy, t, encode_prompts(adapter, pos_prompts, matcher=batch.matcher))
    e_neg = adapter.predict(noisy, t, encode_prompts(adapter, neg_prompts, matcher=batch.matcher))
    s = scales(t).reshape(-1, 1, 1, 1)
    guided = e_neg + s * (e_pos - e_neg)
    goal = noise if adapter.prediction_type == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    err = (guided - goal) ** 2 * (1 if weight is None else weight)
    loss = err.mean()
    if rec_w:
        x0 = (noisy - (1 - a).sqrt() * guided) / a.sqrt() if adapter.prediction_type == "eps" else \
            a.sqrt() * noisy - (1 - a).sqrt() * guided
        loss = loss + rec_w * (adapter.decode_latents(x0) - pixels).abs().mean()
    return loss


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_loss_is_the_guided_objective_with_masks_and_reconstruction_on_rectangular_images(tiny_model, tmp_path,
                                                                                           family):
    model = tiny_model(family)
    setup_run(model, tmp_path, images=2)
    for i in range(2):  # rectangular images, one with a mask
        concept_image(i, 96).crop((0, 0, 96, 64)).save(tmp_path / "data" / f"{i}.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 48:] = 255
    Image.fromarray(mask).save(tmp_path / "data" / "0_att.png")
    Image.new("L", (96, 64), 30).save(tmp_path / "data" / "1_att_proc.png")  # neither a mask of 1 nor an image
    opts = options(tmp_path, training_width=96, training_height=64, batch_size=2, cfg_scale="1.5-4:cos",
                   reconstruction=True, reconstruction_weight=0.5, latent_sampling_method="deterministic")
    with AptSession(model, opts) as session:
        method = session.prepare()
        assert method.data.image_count == 2 and method.data.mask_files == [tmp_path / "data" / "0_att.png"]
        import random
        batch = method.data.make_batch((0, 1), random.Random(0), torch.Generator().manual_seed(11))
        assert batch.negative_prompts == [f"a photo of {NEG}"] * 2 and batch.pixels.shape == (2, 3, 64, 96)
        with torch.no_grad():
            got = method.loss(batch, 0)
            batch.matcher = method.matcher
            grey = torch.from_numpy(np.asarray(Image.fromarray(mask).resize((12, 8), Image.BICUBIC), dtype=np.float32))
            weight = torch.ones(2, 1, 8, 12)
            weight[0, 0] = torch.where(grey <= 127, grey / 127, 1 + 4 * (grey - 127) / 128)
            assert weight[0, 0, :, 0].tolist() == [0] * 8 and weight[0, 0, :, -1].tolist() == [5] * 8
            pixels = torch.stack([to_pixels(Image.open(tmp_path / "data" / f"{i}.png"), (96, 64)) for i in range(2)])
            scales = lambda t: 1.5 + 2.5 * torch.sin(t / 999 * torch.pi / 2)  # noqa: E731
            expected = independent_loss(model, batch, batch.prompts, batch.negative_prompts, scales,
                                        weight=weight, pixels=pixels, rec_w=0.5)
        assert float(got) == pytest.approx(float(expected), rel=2e-4)
        result = session.train()
    assert result.step == 4 and all(np.isfinite(loss) for _, loss in result.losses)


def test_s_of_1_and_a_missing_negative_are_refused_before_anything_is_written(tiny_model, tmp_path):
    model = tiny_model("sd1")
    setup_run(model, tmp_path)
    for overrides, words in [(dict(cfg_scale="1"), "negative embedding would learn nothing"),
                             (dict(cfg_scale="2-3:torch.sqrt(rate)"), "not a scale"),
                             (dict(save_optimizer_state=True), ".optim")]:
        with pytest.raises(AlchemyError, match=words):
            train_apt(model, options(tmp_path, **overrides))
    (tmp_path / "emb" / f"{NEG}.pt").unlink()
    with pytest.raises(AlchemyError, match=f"negative embedding '{NEG}'") as info:
        train_apt(model, options(tmp_path))
    assert "apt create" in info.value.fix
    assert not (tmp_path / "logs").exists()


# ---- optimisation details ------------------------------------------------------------------------------------------

def test_negative_rate_multiplier_holds_through_schedule_stages_and_each_embedding_is_clipped(tiny_model, tmp_path):
    model = tiny_model("sd1")
    setup_run(model, tmp_path)
    opts = options(tmp_path, learn_rate="0.01:2, 0.004:3, 0.001", steps=5, neg_lr_scale=2.5,
                   embedding_clip_norm=1e-3)
    method = prepare(model, opts)
    rates, norms = [], []
    original_create = method.create_optimizer

    def create(groups, lr):
        optimizer = original_create(groups, lr)
        # Registered after APT's clipping hook, so it sees the gradients the update uses.
        optimizer.register_step_pre_hook(record)
        return optimizer

    def record(optimizer, args, kwargs) -> None:
        rates.append([g["lr"] for g in optimizer.param_groups])
        norms.append([float(torch.linalg.vector_norm(h.vectors[""].grad)) for h in (method.pos, method.neg)])

    method.create_optimizer = create
    train_apt(model, opts, method=method)
    expected = [[0.01, 0.025]] * 2 + [[0.004, 0.01]] + [[0.001, 0.0025]] * 2
    assert np.allclose(rates, expected, rtol=1e-12, atol=0)
    assert all(n <= 1e-3 * (1 + 1e-5) for pair in norms for n in pair)
    assert all(n > 0.9e-3 for pair in norms for n in pair)  # the raw gradients are far larger: both were clipped


def test_ema_averages_and_replaces_on_schedule():
    live = {"": torch.zeros(2, 3)}
    ema = Ema(live, decay=0.5, replace_every=3)
    expected = torch.zeros(2, 3)
    for step in range(1, 7):
        live[""] += 1.0  # the optimizer's update
        expected = 0.5 * expected + 0.5 * live[""]
        ema.update(step)
        assert torch.equal(ema.average[""], expected)
        if step % 3 == 0:
            assert torch.equal(live[""], expected)


# ---- resume and previews ---------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_exactly_with_ema(tiny_model, tmp_path):
    model = tiny_model("sd1")
    extra = dict(steps=5, cfg_scale="2-4", ema_decay=0.8, ema_replace_every=2, ema_decay_neg=0.9,
                 ema_replace_every_neg=3, latent_sampling_method="random", batch_size=2)
    for run in ("straight", "stopped"):
        setup_run(model, tmp_path / run)
    straight = train_apt(model, options(tmp_path / "straight", **extra))
    stop = threading.Event()
    first = train_apt(model, options(tmp_path / "stopped", **extra),
                      callbacks=lambda p: stop.set() if p.step == 2 else None, cancel=stop)
    assert first.cancelled and first.step == 2
    assert (first.log_dir / "embeddings" / f"{NAME}-2-neg.pt").is_file()
    second = train_apt(model, resume_options(first.log_dir, AptTrainOptions))
    assert second.step == 5 and second.losses == straight.losses
    for name in (NAME, NEG):
        a, b = (read_embedding(tmp_path / run / "emb" / f"{name}.pt") for run in ("straight", "stopped"))
        assert torch.equal(a.vectors, b.vectors) and a.step == b.step == 5


def test_preview_uses_the_negative_as_negative_prompt_at_the_training_cfg(tiny_model, tmp_path):
    model = tiny_model("sd1")
    setup_run(model, tmp_path)
    opts = options(tmp_path, steps=2, create_image_every=2, cfg_scale="2-4", preview_from_txt2img=False)
    method = prepare(model, opts)
    result = train_apt(model, opts, method=method)
    preview = method.preview_options(2)
    assert (preview.prompt, preview.negative) == (f"a photo of {NAME}", f"a photo of {NEG}")
    assert preview.cfg_scale == pytest.approx(3.0, abs=2e-3)  # the linear schedule's mean
    image = Image.open(result.log_dir / "images" / f"{NAME}-2.png")
    assert f"Negative prompt: a photo of {NEG}" in image.info["parameters"]
    assert read_embedding(result.log_dir / "image_embeddings" / f"{NAME}-2-neg.png").name == f"{NAME}-2-neg"
