"""Textual-inversion training on the tiny model: it learns, the file reproduces the trainer's conditioning,
only the vectors train, interrupt/resume is exact, and bad input fails clearly without writing anything."""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.embeddings.create import create_embedding
from extensions_lib.embeddings.loader import EmbeddingLoader
from extensions_lib.embeddings.method import prepare
from extensions_lib.embeddings.session import train_embedding
from extensions_lib.embeddings.options import EmbeddingTrainOptions
from extensions_lib.embeddings.patch import patch_text_encoders
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import Embedding, read_embedding, write_embedding
from extensions_lib.formats.embedding_pt import load_optimizer_state
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.train.dataset import to_pixels
from extensions_lib.train.diffusion_loss import add_noise
from extensions_lib.train.resume import load_resume_state, resume_options

NAME = "zqxthing"


def concept_image(seed: int, size: int = 64) -> Image.Image:
    """Every image of the concept: a magenta/green checkerboard under per-image noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    checker = ((x // 8 + y // 8) % 2)[..., None]
    base = np.where(checker, np.array([250, 20, 220]), np.array([20, 240, 40]))
    return Image.fromarray(np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8))


def make_dataset(folder: Path, count: int = 3, captions: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        concept_image(i).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"checker {i}, bright", encoding="utf-8")
    return folder


def options(tmp: Path, **overrides) -> EmbeddingTrainOptions:
    values = dict(embedding_name=NAME, embeddings_dir=str(tmp / "emb"), data_root=str(tmp / "data"),
                  template_file=str(tmp / "template.txt"), training_width=64, training_height=64, steps=4, seed=1,
                  save_every=0, create_image_every=0, write_csv_every=0, log_directory=str(tmp / "logs"))
    values.update(overrides)
    return EmbeddingTrainOptions(**values)


def setup_run(adapter, tmp: Path, template: str = "a photo of [name]\n", vectors: int = 2, init: str = "photo",
              images: int = 3) -> None:
    make_dataset(tmp / "data", images)
    (tmp / "template.txt").write_text(template, encoding="utf-8")
    if not (tmp / "emb" / f"{NAME}.pt").exists():
        create_embedding(adapter, NAME, init, vectors, directory=tmp / "emb")


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- it learns -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conditioned_model(tiny_checkpoint):
    """The tiny SD1 model with the UNet's attention outputs and output conv at the usual init scale.

    The tiny checkpoint scales the layers ldm initialises to zero down to 0.1x (so none is exactly zero),
    which leaves its UNet output almost independent of the text: no embedding could lower the loss much.
    """
    from extensions_lib.backend.standalone import load_model

    model = load_model(tiny_checkpoint("sd1"))
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "proj_out" in name or "conv_out" in name:
                param.mul_(10)
    return model


def heldout_loss(adapter, method, images: list[Image.Image], prompt: str) -> float:
    """Denoising loss of held-out images with `prompt`, at fixed timesteps and noise."""
    pixels = torch.stack([to_pixels(im, (64, 64)) for im in images])
    generator = torch.Generator().manual_seed(5)
    timesteps = torch.tensor([50, 150, 300, 450, 600, 750, 900])
    with torch.no_grad(), patch_text_encoders(adapter):
        latents = adapter.encode_images(pixels).mode()
        cond = method.conditioning([prompt]).expand(len(images), -1, -1)
        total = 0.0
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator)
            t_batch = t.repeat(len(images))
            noisy = add_noise(latents, noise, t_batch, adapter.alphas_cumprod)
            total += float(((adapter.predict(noisy, t_batch, cond) - noise) ** 2).mean())
    return total / len(timesteps)


def test_training_lowers_heldout_loss_and_the_file_reproduces_the_trainers_conditioning(conditioned_model,
                                                                                        tmp_path):
    model = conditioned_model
    make_dataset(tmp_path / "data", 4)
    (tmp_path / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
    create_embedding(model, NAME, "photo", 8, directory=tmp_path / "emb")  # "photo" knows nothing of the concept
    opts = options(tmp_path, steps=40, learn_rate="0.3", latent_sampling_method="deterministic")
    method = prepare(model, opts)
    heldout = [concept_image(100 + i) for i in range(3)]
    prompt = f"a photo of {NAME}"
    start = {k: v.detach().clone() for k, v in method.vectors.items()}
    before = heldout_loss(model, method, heldout, prompt)

    result = train_embedding(model, opts, method=method)
    after = heldout_loss(model, method, heldout, prompt)
    assert result.step == 40 and not result.cancelled
    assert after < 0.95 * before, (before, after)

    # Control: moving the start vectors as far as training did, in random directions, changes the loss far
    # less. The drop comes from what the vectors learnt, not from moving them.
    trained = {k: v.detach().clone() for k, v in method.vectors.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            for key, vectors in method.vectors.items():
                step = trained[key] - start[key]
                direction = torch.randn(step.shape, generator=generator)
                vectors.copy_(start[key] + direction * (step.norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)))
        assert abs(heldout_loss(model, method, heldout, prompt) - before) < (before - after) / 3
    with torch.no_grad():
        for key, vectors in method.vectors.items():
            vectors.copy_(trained[key])

    # The saved file, loaded through the loader, gives exactly the trainer's conditioning.
    prompts = [prompt, f"{NAME}, (red {NAME}:1.3) BREAK {NAME} cat"]
    with torch.no_grad():
        with patch_text_encoders(model):
            expected = method.conditioning(prompts)
        with EmbeddingLoader(model, tmp_path / "emb") as loader:
            got = loader.encode(model, prompts)
    assert torch.equal(got, expected)
    saved = read_embedding(tmp_path / "emb" / f"{NAME}.pt")
    assert torch.equal(saved.vectors, trained[""]) and saved.step == 40


# ---- what trains, what is written -------------------------------------------------------------------------------

def test_only_the_vectors_train_latents_are_encoded_once_and_the_run_is_logged(tiny_model, tmp_path, monkeypatch):
    adapter = tiny_model("sd1")
    setup_run(adapter, tmp_path)
    encoded = []
    original_encode = adapter.encode_images
    monkeypatch.setattr(adapter, "encode_images", lambda images: encoded.append(len(images)) or original_encode(images))
    weights = {name: p.detach().clone() for name, p in adapter.text_encoder.named_parameters()}
    vae = {name: p.detach().clone() for name, p in adapter.vae.named_parameters()}
    opts = options(tmp_path, steps=6, save_every=3, create_image_every=3, save_optimizer_state=True, write_csv_every=1)
    assert opts.offload_unused  # the VAE is away while training and back for each preview

    table = adapter.text_encoder.text_model.embeddings.token_embedding
    sizes = []
    result = train_embedding(adapter, opts, callbacks=lambda p: sizes.append(table.weight.numel()))

    assert set(sizes[1:-1]) == {0}  # the token-embedding matrix was out of memory while training
    assert sum(encoded) == 3  # three images, each VAE-encoded once for six steps
    for name, p in adapter.text_encoder.named_parameters():
        assert torch.equal(p, weights[name]) and p.grad is None and not p.requires_grad
    assert all(p.grad is None and not p.requires_grad for m in adapter.modules().values() for p in m.parameters())
    assert all(torch.equal(p, vae[name]) for name, p in adapter.vae.named_parameters())
    state = load_resume_state(result.log_dir)["optimizer"]
    assert [len(g["params"]) for g in state["param_groups"]] == [1]
    assert {tuple(v.shape) for s in state["state"].values() for v in s.values() if v.ndim > 0} == {(2, 32)}

    log = result.log_dir
    assert log.parent.parent == tmp_path / "logs" and log.name == NAME
    for step in (3, 6):
        snapshot = read_embedding(log / "embeddings" / f"{NAME}-{step}.pt")
        assert snapshot.name == f"{NAME}-{step}" and snapshot.step == step
        assert load_optimizer_state(snapshot, log / "embeddings" / f"{NAME}-{step}.pt") is not None
        assert Image.open(log / "images" / f"{NAME}-{step}.png").size == (64, 64)
        in_image = read_embedding(log / "image_embeddings" / f"{NAME}-{step}.png")
        assert in_image.name == f"{NAME}-{step}" and torch.equal(in_image.vectors, snapshot.vectors)
    csv_rows = (log / "textual_inversion_loss.csv").read_text().splitlines()
    assert csv_rows[0] == "step,epoch,epoch_step,loss,learn_rate" and len(csv_rows) == 7
    assert (log / "loss.png").is_file() and len(list(log.glob("settings-*.json"))) == 1

    final = tmp_path / "emb" / f"{NAME}.pt"
    assert result.final_path == final and check_host_loadable(final) == []
    emb = read_embedding(final)
    assert emb.name == NAME and emb.step == 6 and torch.equal(emb.vectors, snapshot.vectors)
    assert emb.sd_checkpoint == adapter.checkpoint_hash and emb.sd_checkpoint_name == "tiny-sd1"
    assert emb.extra["provenance"]["dataset_images"] == 3
    assert load_optimizer_state(emb, final) is not None


def test_a_new_run_continues_the_optimizer_state_and_step_count_of_the_file(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    setup_run(adapter, tmp_path)
    train_embedding(adapter, options(tmp_path, steps=2, save_optimizer_state=True))
    result = train_embedding(adapter, options(tmp_path, steps=3, save_optimizer_state=True,
                                              log_directory=str(tmp_path / "logs2")))
    assert read_embedding(tmp_path / "emb" / f"{NAME}.pt").step == 5  # counted on, as the WebUI does
    state = load_resume_state(result.log_dir)["optimizer"]["state"]
    assert int(next(iter(state.values()))["step"]) == 5  # AdamW went on from the saved state


def test_interrupted_run_saves_and_resume_continues_exactly(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    template = "a photo of [name]\na picture of [name], [filewords]\n"
    extra = dict(steps=6, latent_sampling_method="random", tag_drop_out=0.3, shuffle_tags=True, batch_size=2)
    for run in ("straight", "stopped"):
        setup_run(adapter, tmp_path / run, template)
    straight = train_embedding(adapter, options(tmp_path / "straight", **extra))

    stop = threading.Event()
    stopped_opts = options(tmp_path / "stopped", save_optimizer_state=True, **extra)
    first = train_embedding(adapter, stopped_opts, callbacks=lambda p: stop.set() if p.step == 3 else None,
                            cancel=stop)
    assert first.cancelled and first.step == 3
    snapshot = first.log_dir / "embeddings" / f"{NAME}-3.pt"
    assert snapshot.is_file() and (first.log_dir / "embeddings" / f"{NAME}-3.pt.optim").is_file()
    # as the WebUI does on Interrupt, the trained vectors also go to the embeddings folder's file
    assert first.final_path == tmp_path / "stopped" / "emb" / f"{NAME}.pt"
    in_folder = read_embedding(first.final_path)
    assert in_folder.step == 3 and torch.equal(in_folder.vectors, read_embedding(snapshot).vectors)

    resumed_opts = resume_options(first.log_dir, EmbeddingTrainOptions)
    assert resumed_opts.seed == stopped_opts.seed
    second = train_embedding(adapter, resumed_opts)
    assert second.step == 6 and second.losses == straight.losses
    a = read_embedding(tmp_path / "straight" / "emb" / f"{NAME}.pt")
    b = read_embedding(tmp_path / "stopped" / "emb" / f"{NAME}.pt")
    assert torch.equal(a.vectors, b.vectors) and a.step == b.step == 6


# ---- bad input ------------------------------------------------------------------------------------------------

def _truncated_png(path: Path) -> None:
    concept_image(9).save(path)
    path.write_bytes(path.read_bytes()[:200])


def _bad_dataset(kind: str, data: Path) -> None:
    data.mkdir(parents=True, exist_ok=True)
    if kind == "image-less":
        (data / "a.txt").write_text("just a caption")
    elif kind == "unreadable":
        _truncated_png(data / "cut.png")
        (data / "fake.png").write_text("not a png")
    elif kind == "odd caption":
        concept_image(0).save(data / "0.png")
        (data / "0.txt").write_bytes("checker, bright".encode("utf-16"))


@pytest.mark.parametrize("case, message", [
    ("empty dataset", "no usable training images"),
    ("image-less", "no usable training images"),
    ("unreadable", "cannot be read as an image"),
    ("odd caption", "caption file is not UTF-8"),
    ("template without [name]", "lack \\[name\\]"),
    ("name glued to a word", "does not contain the embedding name"),
    ("bad schedule", "not a whole number"),
    ("wrong width", "48 wide"),
    ("unexpected pickle", "system"),
    ("missing embedding", "no embedding named"),
])
def test_bad_input_is_a_clear_error_and_nothing_is_written(tiny_model, tmp_path, case, message):
    adapter = tiny_model("sd1")
    setup_run(adapter, tmp_path)
    opts = options(tmp_path)
    if case in ("empty dataset", "image-less", "unreadable", "odd caption"):
        for p in (tmp_path / "data").iterdir():
            p.unlink()
        _bad_dataset(case, tmp_path / "data")
    elif case == "template without [name]":
        (tmp_path / "template.txt").write_text("a photo of [name]\na photo of something\n")
    elif case == "name glued to a word":
        (tmp_path / "template.txt").write_text("a photo of [name]s\n")
    elif case == "bad schedule":
        opts = dataclasses.replace(opts, learn_rate="0.005:abc")
    elif case == "wrong width":
        write_embedding(Embedding(NAME, torch.ones(2, 48)), tmp_path / "emb" / f"{NAME}.pt")
    elif case == "unexpected pickle":
        from test_embeddings_library import evil_pt

        evil_pt(tmp_path / "emb" / f"{NAME}.pt")
    elif case == "missing embedding":
        opts = dataclasses.replace(opts, embedding_name="nothing")
    before = folder_digest(tmp_path)
    with pytest.raises(AlchemyError, match=message):
        train_embedding(adapter, opts)
    assert folder_digest(tmp_path) == before
    assert not (tmp_path / "logs").exists()


def test_unreadable_images_beside_good_ones_are_skipped_with_reasons(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    setup_run(adapter, tmp_path)
    _truncated_png(tmp_path / "data" / "cut.png")
    method = prepare(adapter, options(tmp_path))
    assert len(method.data.dataset) == 3
    (skipped,) = method.data.dataset.skipped
    assert skipped.path.name == "cut.png" and "cannot be read" in skipped.reason


def test_an_adapter_that_places_parts_itself_keeps_them(tiny_checkpoint, tmp_path):
    """With offloading by the adapter (or a WebUI --medvram host), the session moves nothing itself."""
    from extensions_lib.backend.standalone import load_model

    adapter = load_model(tiny_checkpoint("sd1"), offload=True)
    setup_run(adapter, tmp_path)
    table = adapter.text_encoder.text_model.embeddings.token_embedding
    sizes = []
    result = train_embedding(adapter, options(tmp_path, steps=2),
                             callbacks=lambda p: sizes.append((table.weight.numel(), adapter.vae.encoder.conv_in.weight.numel())))
    assert result.step == 2 and sizes and all(t > 0 and v > 0 for t, v in sizes)
