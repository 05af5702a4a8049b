"""Hypernetwork training on the tiny model: it learns (held-out loss falls), only the hypernetwork trains
while the model stays frozen and in eval mode, interrupt + resume is exact, and it writes the WebUI's
files (snapshots, final file, .optim side file, loss CSV, previews)."""
from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.hypernetworks.file import (optimizer_path, read_hypernetwork, read_optimizer_state,
                                               write_hypernetwork)
from extensions_lib.hypernetworks.method import (PROVENANCE_KEY, HypernetworkMethod, attach, learn_rate_warning,
                                                 plain_name, stack_conds, train_hypernetwork)
from extensions_lib.train.lr_schedule import parse_schedule
from extensions_lib.train.setup import frozen_model
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
from extensions_lib.hypernetworks.patch import apply_hypernetworks
from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
from extensions_lib.prompt import encode_prompts
from extensions_lib.safe_pickle import safe_load
from extensions_lib.train.batches import build_training_data
from extensions_lib.train.dataset import to_pixels
from extensions_lib.train.diffusion_loss import denoising_loss
from extensions_lib.train.provenance import collect
from extensions_lib.train.resume import resume_options

TINY_WIDTHS = [32, 64]  # the tiny UNet's attention widths (text context and level-1 self-attention: 32; mid: 64)


def striped_image(path: Path, seed: int) -> Path:
    """Red vertical stripes on dark grey, noisy and shifted per seed: one shared visual concept."""
    rng = np.random.default_rng(seed)
    pixels = np.full((64, 64, 3), 20, np.float64)
    pixels[:, ::8] = pixels[:, 1::8] = (230, 40, 40)
    pixels = np.roll(pixels + rng.normal(0, 15, pixels.shape), int(rng.integers(0, 8)), axis=1)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def dataset(folder: Path, n: int = 4, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        striped_image(folder / f"img{i}.png", seed + i)
        (folder / f"img{i}.txt").write_text(f"stripes, red, pattern {i}", encoding="utf-8")
    return folder


def new_file(directory: Path, name: str = "hn", activation: str = "relu", dropout=None, sizes=TINY_WIDTHS,
             step: int = 0) -> Path:
    torch.manual_seed(0)
    hn = Hypernetwork.create(name, sizes, Architecture((1, 2, 1), activation, dropout_structure=dropout),
                             use_dropout=dropout is not None)
    hn.step = step
    path = directory / f"{name}.pt"
    write_hypernetwork(hn, path)
    return path


def options(root: Path, **kw) -> HypernetworkTrainOptions:
    base = dict(hypernetwork_name="hn", hypernetwork_dir=str(root / "hypernetworks"), data_root=str(root / "data"),
                template_file="filewords", training_width=64, training_height=64, steps=6, seed=3,
                learn_rate="0.001", log_directory=str(root / "logs"), save_every=0, create_image_every=0,
                write_csv_every=1, batch_size=2, preview_from_txt2img=True, preview_prompt="stripes",
                preview_steps=2, preview_width=64, preview_height=64)
    base.update(kw)
    return HypernetworkTrainOptions(**base)


def unet_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return model.predict(x, torch.tensor([400]), cond)


def model_flags(model):
    return ([p.requires_grad for part in model.modules().values() for p in part.parameters()],
            [m.training for part in model.modules().values() for m in part.modules()])


# ---- options and small pieces ----------------------------------------------------------------------------

def test_defaults_and_learning_rate_warning():
    opts = HypernetworkTrainOptions()
    assert opts.learn_rate == "0.00001"  # the WebUI's hypernetwork default
    assert learn_rate_warning(parse_schedule(opts.learn_rate, opts.steps)) is None
    assert learn_rate_warning(parse_schedule("5e-6:100, 1e-5", 1000)) is None
    for risky in ("0.005", "1e-5:100, 1e-3", "0.0001"):
        warning = learn_rate_warning(parse_schedule(risky, 1000))
        assert warning and "destroy hypernetworks" in warning and "1e-05" in warning
    with pytest.raises(AlchemyError, match="learn_rate"):
        learn_rate_warning(parse_schedule("fast", 10))


def test_plain_name_strips_the_dropdown_hash():
    assert plain_name("anime (5dbbf6f2c1)") == "anime"
    assert plain_name("my net v2 ") == "my net v2"
    assert plain_name("net (v2)") == "net (v2)"


def test_stack_conds_pads_with_the_last_token_vector():
    a, b = torch.randn(154, 8), torch.randn(77, 8)
    out = stack_conds([a, b])
    assert out.shape == (2, 154, 8) and torch.equal(out[0], a) and torch.equal(out[1, :77], b)
    assert torch.equal(out[1, 77:], b[-1:].expand(77, -1))


# ---- the method -------------------------------------------------------------------------------------------

def test_only_hypernetwork_parameters_get_gradients_and_the_model_is_restored(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks", dropout=[0, 0.2, 0])
    opts = options(tmp_path)
    flags_before, out_before = model_flags(model), unet_output(model)
    hn = read_hypernetwork(path)
    with frozen_model(model):
        data = build_training_data(model, opts, name="hn", require_name=False)
        patch = attach(hn, model, path, say=pytest.fail)
        try:
            hn.train()
            method = HypernetworkMethod(model, hn, data, opts, collect(model, data.dataset), final_path=path)
            batch = data.make_batch(data.epoch(0)[0][0], random.Random(0), torch.Generator().manual_seed(0))
            method.loss(batch, 0).backward()
            assert not any(m.training for part in model.modules().values() for m in part.modules())
            assert all(m.training for m in hn.modules())  # the hypernetwork's own dropout is on
            assert all(p.grad is None and not p.requires_grad
                       for part in model.modules().values() for p in part.parameters())
            params = method.parameters()
            assert len(params) == 2 * 2 * 4  # 2 widths x (k, v) x (2 Linear x (weight, bias))
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        finally:
            patch.unpatch()
            hn.eval()
    assert model_flags(model) == flags_before
    assert torch.equal(unet_output(model), out_before)


def test_static_prompts_are_encoded_once_and_equal_a_fresh_encoding(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks")
    opts = options(tmp_path)
    data = build_training_data(model, opts, name="hn", require_name=False)
    assert data.prompts_are_static
    method = HypernetworkMethod(model, read_hypernetwork(path), data, opts, collect(model, data.dataset), path)
    calls = []
    real = model.encode_token_chunks
    model.encode_token_chunks = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        prompts = ["stripes, red, pattern 0", "stripes, red, pattern 1"]
        first = method.conditioning(prompts)
        second = method.conditioning(prompts[::-1])
    finally:
        del model.encode_token_chunks
    assert len(calls) == 2  # one per distinct prompt, none the second time
    with torch.no_grad():
        fresh = encode_prompts(model, prompts)
    assert torch.equal(first, fresh) and torch.equal(second, fresh.flip(0))


def test_previews_follow_the_webui_unless_txt2img_settings_are_used(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks")
    opts = options(tmp_path, preview_from_txt2img=False, training_width=128, training_height=64, clip_skip=2)
    data = build_training_data(model, opts, name="hn", require_name=False)
    method = HypernetworkMethod(model, read_hypernetwork(path), data, opts, collect(model, data.dataset), path)
    batch = data.make_batch(data.epoch(0)[0][0], random.Random(0), torch.Generator().manual_seed(0))
    with attach(method.hypernetwork, model, path, pytest.fail):
        method.loss(batch, 0)
    gen = method.preview_options()
    assert (gen.prompt, gen.steps, gen.seed, gen.width, gen.height, gen.clip_skip) == \
        (batch.prompts[0], 20, 3, 128, 64, 2)
    method.options = options(tmp_path, preview_seed=-1, preview_steps=7)
    gen = method.preview_options()
    assert (gen.prompt, gen.steps, gen.seed, gen.width) == ("stripes", 7, 3, 64)


def test_held_out_denoising_loss_falls(tmp_path, tiny_model):
    """Trained on striped images, the hypernetwork denoises other striped images better than the untrained
    one, measured with the same noise and timesteps for both."""
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks")
    held_out = torch.stack([to_pixels(Image.open(striped_image(tmp_path / f"held{i}.png", 100 + i)).convert("RGB"),
                                      (64, 64)) for i in range(4)])
    with torch.no_grad():
        latents = model.encode_images(held_out).mode()
        cond = encode_prompts(model, ["stripes, red"] * 4)

    def held_out_loss(hn: Hypernetwork) -> float:
        with apply_hypernetworks([(hn, 1.0)], model.attention_modules()), torch.no_grad():
            return float(np.mean([denoising_loss(model, latents, cond, generator=torch.Generator().manual_seed(seed))
                                  .item() for seed in range(8)]))

    untrained = held_out_loss(read_hypernetwork(path))
    result = train_hypernetwork(model, options(tmp_path, steps=100, learn_rate="0.005", template_file="filewords",
                                               write_csv_every=0, save_resume_state=False), say=lambda _: None)
    assert result.step == 100 and result.final_path == path
    trained = held_out_loss(read_hypernetwork(path))
    assert trained < 0.97 * untrained, (untrained, trained)


def test_model_is_frozen_in_eval_mode_while_training_and_restored_after(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    new_file(tmp_path / "hypernetworks", dropout=[0, 0.2, 0])
    flags_before, out_before = model_flags(model), unet_output(model)
    to_k = model.attention_modules()[0][1].to_k
    probe = torch.randn(1, 3, to_k.in_features)
    seen = []

    def check(progress):
        grads, modes = model_flags(model)
        with torch.no_grad():  # the projection sees the hypernetwork's output, whatever way the patch works
            patched = not torch.equal(to_k(probe), torch.nn.functional.linear(probe, to_k.weight, to_k.bias))
        seen.append((any(grads), any(modes), patched))

    train_hypernetwork(model, options(tmp_path, steps=3), callbacks=check, say=lambda _: None)
    assert seen and all(s == (False, False, True) for s in seen)
    assert torch.equal(to_k(probe), torch.nn.functional.linear(probe, to_k.weight, to_k.bias))
    assert model_flags(model) == flags_before
    assert torch.equal(unet_output(model), out_before)  # the patch is gone


def _trained_params(path: Path) -> list[torch.Tensor]:
    hn = read_hypernetwork(path)
    return [p.detach() for m in hn.modules() for p in m.parameters()]


def test_interrupt_and_resume_is_exact(tmp_path, tiny_model):
    """Tag shuffling (fresh prompts each step) and hypernetwork dropout (global RNG) both in play."""
    model = tiny_model("sd1")
    data = dataset(tmp_path / "data", n=5)
    kw = dict(data_root=str(data), steps=8, shuffle_tags=True, save_every=3, create_image_every=3,
              gradient_step=2, latent_sampling_method="random")
    for run in ("a", "b"):
        new_file(tmp_path / run / "hypernetworks", dropout=[0, 0.2, 0])
    straight = train_hypernetwork(model, options(tmp_path / "a", **kw), say=lambda _: None)

    cancel = threading.Event()
    stopped = train_hypernetwork(model, options(tmp_path / "b", **kw), cancel=cancel, say=lambda _: None,
                                 callbacks=lambda p: cancel.set() if p.step == 4 else None)
    assert stopped.cancelled and stopped.step == 4 and stopped.final_path is None
    snapshot = stopped.log_dir / "hypernetworks" / "hn-4.pt"
    assert read_hypernetwork(snapshot).step == 4
    assert read_hypernetwork(tmp_path / "b" / "hypernetworks" / "hn.pt").step == 0  # the source is untouched
    torch.manual_seed(1234)  # as if in a new process

    again = resume_options(stopped.log_dir, HypernetworkTrainOptions)
    resumed = train_hypernetwork(model, again, say=lambda _: None)
    assert resumed.step == straight.step == 8
    assert not any("changed" in w for w in resumed.warnings)
    assert resumed.losses == straight.losses
    for mine, theirs in zip(_trained_params(tmp_path / "b" / "hypernetworks" / "hn.pt"),
                            _trained_params(tmp_path / "a" / "hypernetworks" / "hn.pt")):
        assert torch.equal(mine, theirs)
    csv = "hypernetwork_loss.csv"
    assert (resumed.log_dir / csv).read_text() == (straight.log_dir / csv).read_text()


def test_written_files_follow_the_webui(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks", step=5)  # a file trained before: steps count on from 5
    result = train_hypernetwork(model, options(tmp_path, steps=4, save_every=2, create_image_every=4,
                                               save_optimizer_state=True, source_note="own drawings"),
                                say=lambda _: None)
    log_dir = result.log_dir
    assert log_dir.parent.parent == tmp_path / "logs" and log_dir.name == "hn"
    snapshots = sorted(p.name for p in (log_dir / "hypernetworks").glob("*.pt"))
    assert snapshots == ["hn-7.pt", "hn-9.pt"]
    for file in [path, *(log_dir / "hypernetworks").glob("*.pt")]:
        assert check_host_loadable(file) == [], file
        raw = safe_load(file)
        assert raw["name"] == "hn" and raw["sd_checkpoint"] == model.checkpoint_hash
        assert raw["sd_checkpoint_name"] == model.checkpoint_name
        assert raw[PROVENANCE_KEY]["source_note"] == "own drawings"
        assert raw[PROVENANCE_KEY]["dataset_images"] == 4
        assert check_host_loadable(optimizer_path(file)) == []
        name, state = read_optimizer_state(file)  # the side file matches this very file
        assert name == "AdamW" and state is not None and len(state["state"]) == 16
    assert safe_load(path)["step"] == 9 and read_hypernetwork(log_dir / "hypernetworks" / "hn-7.pt").step == 7
    assert torch.equal(torch.cat([p.flatten() for p in _trained_params(path)]),
                       torch.cat([p.flatten() for p in _trained_params(log_dir / "hypernetworks" / "hn-9.pt")]))
    rows = (log_dir / "hypernetwork_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate" and len(rows) == 5
    preview = log_dir / "images" / "hn-9.png"
    assert "Hypernet: hn" in Image.open(preview).info["parameters"]
    assert list(log_dir.glob("settings-*.json"))


def test_training_continues_with_the_saved_optimizer_state(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks")
    train_hypernetwork(model, options(tmp_path, steps=2, save_optimizer_state=True, save_resume_state=False),
                       say=lambda _: None)
    _, saved = read_optimizer_state(path)
    hn = read_hypernetwork(path)
    opts = options(tmp_path)
    data = build_training_data(model, opts, name="hn", require_name=False)
    method = HypernetworkMethod(model, hn.train(), data, opts, collect(model, data.dataset), path, say=pytest.fail)
    optimizer = method.create_optimizer([{"params": method.parameters(), "lr_scale": 1.0}], 1e-3)
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], saved["state"][i]["exp_avg"]) for i in saved["state"])
    path.write_bytes(path.read_bytes() + b"\0")  # the .pt changed: its side file no longer counts
    assert method.create_optimizer([{"params": method.parameters()}], 1e-3).state_dict()["state"] == {}


def test_widths_the_model_lacks(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    flags_before, out_before = model_flags(model), unet_output(model)
    path = new_file(tmp_path / "hypernetworks", sizes=[768, 320])
    with pytest.raises(AlchemyError, match=r"widths \[768, 320\].*\[32, 64\]") as info:
        train_hypernetwork(model, options(tmp_path), say=lambda _: None)
    assert str(path) in str(info.value)
    assert model_flags(model) == flags_before
    assert torch.equal(unet_output(model), out_before)

    new_file(tmp_path / "hypernetworks", sizes=[32, 768])
    said = []
    train_hypernetwork(model, options(tmp_path, steps=1), say=said.append)
    assert any("[768]" in s and "do not occur" in s for s in said)


def test_missing_hypernetwork_is_named(tmp_path, tiny_model):
    dataset(tmp_path / "data")
    with pytest.raises(AlchemyError, match="no hypernetwork named 'nope'") as info:
        train_hypernetwork(tiny_model("sd1"), options(tmp_path, hypernetwork_name="nope"))
    assert str(tmp_path / "hypernetworks") in str(info.value)
    with pytest.raises(AlchemyError, match="no hypernetwork to train"):
        train_hypernetwork(tiny_model("sd1"), options(tmp_path, hypernetwork_name=""))


# ---- what the WebUI reads back ----------------------------------------------------------------------------

def test_settings_json_has_every_key_the_webui_writes(tmp_path, tiny_model, webui_files):
    import json

    dataset(tmp_path / "data")
    new_file(tmp_path / "hypernetworks", activation="swish", dropout=[0, 0.2, 0])
    result = train_hypernetwork(tiny_model("sd1"), options(tmp_path, steps=1, save_every=1), say=lambda _: None)
    (settings_path,) = result.log_dir.glob("settings-*.json")
    ours = json.loads(settings_path.read_text(encoding="utf-8"))
    genuine = json.loads((webui_files / "ref-hn-121-relu-trained.train-settings.json").read_text(encoding="utf-8"))
    assert set(genuine) <= set(ours), sorted(set(genuine) - set(ours))
    assert (ours["layer_structure"], ours["activation_func"], ours["weight_init"], ours["add_layer_norm"],
            ours["use_dropout"], ours["save_hypernetwork_every"], ours["hypernetwork_name"]) == \
        ([1, 2, 1], "swish", "Normal", False, True, 1, "hn")
    for key in ("layer_structure", "activation_func", "weight_init", "add_layer_norm", "use_dropout"):
        assert type(ours[key]) is type(genuine[key]), key


def test_trained_files_load_in_the_hosts_code_and_resume_its_optimizer(tmp_path, tiny_model):
    """A PReLU hypernetwork with dropout, trained here: the final file and the snapshot build in the host's
    module code and compute what ours do, and the host's optimizer (AdamW over every parameter of every
    module, PReLU slopes included) takes our .optim state."""
    from host_hypernetwork_reference import host_load_hypernetwork, host_optimizer

    model = tiny_model("sd1")
    dataset(tmp_path / "data")
    path = new_file(tmp_path / "hypernetworks", activation="prelu", dropout=[0, 0.2, 0])
    untrained_slopes = [m.linear[1].weight.clone() for m in read_hypernetwork(path).modules()]
    result = train_hypernetwork(model, options(tmp_path, steps=2, save_every=1, save_optimizer_state=True),
                                say=lambda _: None)
    snapshot = result.log_dir / "hypernetworks" / "hn-1.pt"
    for file in (path, snapshot):
        host, ours = host_load_hypernetwork(file), read_hypernetwork(file)
        assert host.step == ours.step and host.dropout_structure == [0, 0.2, 0]
        for size in TINY_WIDTHS:
            x = torch.randn(1, 4, size)
            for host_module, our_module in zip(host.layers[size], ours.layers[size]):
                assert torch.equal(host_module(x), our_module(x))
        state = host_optimizer(host).state_dict()["state"]
        assert len(state) == len(host.weights()) == 2 * 2 * 5  # 2 widths x (k, v) x (2 Linear x 2 + PReLU)
    trained_slopes = [m.linear[1].weight for m in read_hypernetwork(path).modules()]
    assert all(not torch.equal(a, b) for a, b in zip(untrained_slopes, trained_slopes))  # the slopes train too


def test_a_renamed_file_trains_under_its_file_name_as_in_the_webui(tmp_path, tiny_model):
    """The host names the log folder, the snapshots and the saved ``name`` after the hypernetwork it was asked
    to train (the file name), not the name stored inside a file that was renamed since."""
    dataset(tmp_path / "data")
    new_file(tmp_path / "hypernetworks", name="inner")
    (tmp_path / "hypernetworks" / "inner.pt").rename(tmp_path / "hypernetworks" / "outer.pt")
    result = train_hypernetwork(tiny_model("sd1"), options(tmp_path, hypernetwork_name="outer", steps=2, save_every=1),
                                say=lambda _: None)
    assert result.log_dir.name == "outer" and result.final_path == tmp_path / "hypernetworks" / "outer.pt"
    assert sorted(p.name for p in (result.log_dir / "hypernetworks").glob("*.pt")) == ["outer-1.pt", "outer-2.pt"]
    assert safe_load(result.final_path)["name"] == "outer"
