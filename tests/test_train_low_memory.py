"""Low-memory training: half-stored frozen layers compute in float32 (or bfloat16) and train like the float32 model.

Tolerances for the bfloat16 path: bfloat16 keeps 8 significant bits, so each stored weight and each layer's
result is rounded by up to 2**-9 (0.2%) of its size. Through the tiny UNet's chain of about 30 layers these
roundings add up like a random walk (sqrt(30) * 0.3% = 1.6%), and the backward pass adds its own: measured,
the output is 1.6% off the float32 one and the input gradient 2.6% (norm of the difference over the norm of
the float32 result; the full-size SD1 UNet at 256 px: 0.8% for the gradient). The tests allow 5%, well below
what a wrong, missing or overflowing weight makes.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from extensions_lib.backend.standalone import load_model
from extensions_lib.embeddings.create import create_embedding
from extensions_lib.embeddings.method import prepare
from extensions_lib.embeddings.session import train_embedding
from extensions_lib.formats.embedding import read_embedding
from extensions_lib.train.low_memory import (BF16, CPU_BF16_TORCH, FP16_STORED, Precision, bf16_supported,
                                             half_stored_layers, load_low_memory, precision_for)

from test_embeddings_train import NAME, concept_image, heldout_loss, make_dataset, options

BF16_TOLERANCE = 0.05
"""Relative (norm) difference allowed between bfloat16 and float32 results; see the module docstring."""
needs_bf16_torch = pytest.mark.skipif(torch.__version__ < CPU_BF16_TORCH,
                                      reason="torch's CPU bfloat16 attention backward is unsafe before 2.4")
PRECISIONS = [FP16_STORED, pytest.param(BF16, marks=needs_bf16_torch)]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def fp16_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny SD1 model (output layers at the usual init scale, so the text matters: see
    test_embeddings_train.conditioned_model) written as a float16 file, as most real checkpoints are."""
    model = load_model(tiny_checkpoint("sd1"))
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "proj_out" in name or "conv_out" in name:
                param.mul_(10)
    tensors = {key: (t.half() if t.is_floating_point() and not key.startswith(("alphas", "betas")) else t).contiguous()
               for key, t in model.ldm_state_dict()}
    path = tmp_path_factory.mktemp("fp16") / "tiny-fp16.safetensors"
    save_file(tensors, str(path))
    return path


def _layers(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _unet_output_and_input_grad(unet: nn.Module):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    cond = torch.randn(2, 77, 32, generator=generator)
    out = unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.describe())
def test_half_stored_layers_give_the_float32_results_and_restore_the_weights_exactly(fp16_checkpoint, precision):
    unet = load_model(fp16_checkpoint).unet
    layers = _layers(unet)
    if precision == BF16:      # values bfloat16 cannot hold: restoring them needs the kept originals
        with torch.no_grad():
            for m in layers:
                m.weight.add_(torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(3)) * 1e-4)
        assert not all(torch.equal(m.weight.bfloat16().float(), m.weight) for m in layers)
    before = {name: t.clone() for name, t in unet.state_dict().items()}
    out, grad = _unet_output_and_input_grad(unet)
    with half_stored_layers(unet, precision) as converted:
        assert converted == len(layers) > 20
        assert all(m.weight.dtype == precision.storage for m in layers)
        assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if n.endswith("bias"))
        out_half, grad_half = _unet_output_and_input_grad(unet)
    assert grad_half.dtype == torch.float32         # the gradient goes back in the input's dtype
    if precision == FP16_STORED:
        torch.testing.assert_close(out_half, out, rtol=0, atol=1e-6)
        torch.testing.assert_close(grad_half, grad, rtol=1e-5, atol=1e-7)
    else:
        assert out_half.dtype == torch.bfloat16
        assert relative_error(out_half, out) < BF16_TOLERANCE and relative_error(grad_half, grad) < BF16_TOLERANCE
        assert not torch.equal(out_half.float(), out)
    after = unet.state_dict()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in before.items())
    assert all("forward" not in m.__dict__ for m in layers)


def test_weights_float16_cannot_hold_stay_float32_unless_rounding_is_allowed(tiny_checkpoint):
    unet = load_model(tiny_checkpoint("sd1")).unet      # float32 random weights
    out, _ = _unet_output_and_input_grad(unet)
    with half_stored_layers(unet) as converted:
        assert converted == 0
    with half_stored_layers(unet, exact=False) as converted:
        assert converted == len(_layers(unet))
        rounded, _ = _unet_output_and_input_grad(unet)
    torch.testing.assert_close(rounded, out, rtol=0, atol=5e-2)
    assert not torch.equal(rounded, out)


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.describe())
def test_load_low_memory_halves_the_layer_weights_and_predicts_as_float32(fp16_checkpoint, precision):
    full, low = load_model(fp16_checkpoint), load_low_memory(fp16_checkpoint, precision=precision)
    assert low.low_memory == precision
    for name, module in low.modules().items():
        layer_weights = {id(m.weight) for m in _layers(module)}
        stored = torch.float16 if name == "vae" else precision.storage      # the VAE: float16, float32 compute
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                assert tensor.dtype == (stored if id(tensor) in layer_weights else torch.float32), name
    size = lambda m: sum(t.numel() * t.element_size() for t in m.parameters())     # noqa: E731
    assert size(low.unet) < 0.55 * size(full.unet)
    assert low.dtype == torch.float32
    generator = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    tokens = torch.randint(0, 1000, (1, 77), generator=generator)
    with torch.no_grad():
        low_out, full_out = low.predict(x, torch.tensor([300]), cond), full.predict(x, torch.tensor([300]), cond)
        low_text, full_text = low.text_encoder(tokens)[0], full.text_encoder(tokens)[0]
        assert low_text.dtype == torch.float32
        if precision == FP16_STORED:
            torch.testing.assert_close(low_out, full_out, rtol=0, atol=1e-6)
            torch.testing.assert_close(low_text, full_text, rtol=0, atol=1e-5)
        else:
            assert relative_error(low_out, full_out) < BF16_TOLERANCE
            assert relative_error(low_text, full_text) < BF16_TOLERANCE
        torch.testing.assert_close(low.decode_latents(x), full.decode_latents(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.describe())
def test_low_memory_training_learns_like_float32_training(fp16_checkpoint, tmp_path, monkeypatch, precision):
    from extensions_lib.train import low_memory

    monkeypatch.setattr(low_memory, "precision_for", lambda device: precision)      # what the session picks
    heldout, prompt = [concept_image(100 + i) for i in range(3)], f"a photo of {NAME}"
    results, losses = {}, {}
    for mode in ("float32", "loaded-low", "session-low"):
        tmp = tmp_path / mode
        make_dataset(tmp / "data", 4)
        (tmp / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
        model = load_low_memory(fp16_checkpoint, precision=precision) if mode == "loaded-low" \
            else load_model(fp16_checkpoint)
        create_embedding(model, NAME, "photo", 8, directory=tmp / "emb")
        opts = options(tmp, steps=30, learn_rate="0.3", latent_sampling_method="deterministic",
                       low_memory=mode != "float32", save_training_settings=True)
        method = prepare(model, opts)
        optimizers = []
        make_optimizer = method.create_optimizer
        method.create_optimizer = lambda groups, lr: optimizers.append(make_optimizer(groups, lr)) or optimizers[-1]
        start = torch.cat([v.detach().clone() for v in method.vectors.values()])
        before = heldout_loss(model, method, heldout, prompt)
        seen, losses[mode] = set(), []

        def watch(p):
            # conv_in: also float32 training keeps some layers in float16 (low_res_layers), never this one
            conv_in = model.unet.conv_in
            seen.add(getattr(conv_in, "conv", conv_in).weight.dtype)      # (lean_backward wraps it in float32)
            if p.loss is not None:
                losses[mode].append(p.loss)
        train_embedding(model, opts, method=method, callbacks=watch)
        assert seen == {torch.float32 if mode == "float32" else precision.storage}
        # the trained vectors, their gradients and the optimizer state stayed float32
        assert all(v.dtype == torch.float32 for v in method.vectors.values())
        states = [t for state in optimizers[0].state.values() for t in state.values() if torch.is_tensor(t)]
        assert states and all(t.dtype == torch.float32 for t in states if t.is_floating_point())
        after = heldout_loss(model, method, heldout, prompt)
        assert after < 0.95 * before, (mode, before, after)
        results[mode] = read_embedding(tmp / "emb" / f"{NAME}.pt").vectors
        settings = json.loads(next((tmp / "logs").rglob("settings-*.json")).read_text(encoding="utf-8"))
        assert settings["provenance"]["precision"] == ("" if mode == "float32" else precision.describe())
        if mode == "session-low":       # the session put the float32 weights back
            assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    moved = (results["float32"] - start).norm()
    for mode in ("loaded-low", "session-low"):
        if precision == FP16_STORED:
            # Adam at this rate magnifies rounding-order differences; the runs must still agree to 2% of the move
            assert (results[mode] - results["float32"]).norm() <= 0.02 * moved, mode
            torch.testing.assert_close(losses[mode][0], losses["float32"][0], rtol=1e-4, atol=0)
        else:
            # The first step sees the same vectors, batch and noise: its loss differs by the rounding alone
            # (measured 0.02%). Later steps follow slightly different vectors; the run's losses must stay as
            # close on average and it must end where float32 training ends, to 15% of the distance moved
            # (measured 0.08% and 6%).
            assert abs(losses[mode][0] - losses["float32"][0]) <= 0.005 * losses["float32"][0], mode
            mean = lambda values: sum(values) / len(values)      # noqa: E731
            assert abs(mean(losses[mode]) - mean(losses["float32"])) <= 0.005 * mean(losses["float32"]), mode
            assert (results[mode] - results["float32"]).norm() <= 0.15 * moved, mode


def test_cli_low_memory_flag_loads_half_stored_and_trains(fp16_checkpoint, tmp_path, monkeypatch):
    from extensions_lib.cli import main
    from extensions_lib.train import low_memory

    from test_embeddings_cli import NAME as CLI_NAME, train_args

    loaded = []
    real = low_memory.load_low_memory

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(low_memory, "load_low_memory", spy)
    make_dataset(tmp_path / "data", 2)
    assert main(["embedding", "create", "--ckpt", str(fp16_checkpoint), "--name", CLI_NAME, "--embeddings-dir",
                 str(tmp_path / "emb")]) == 0
    start = read_embedding(tmp_path / "emb" / f"{CLI_NAME}.pt").vectors
    assert main(train_args(fp16_checkpoint, tmp_path, "emb", "logs", "--steps", "2", "--low-memory")) == 0
    assert len(loaded) == 1
    assert loaded[0].unet.time_embedding.linear_1.weight.dtype == precision_for("cpu").storage
    trained = read_embedding(tmp_path / "emb" / f"{CLI_NAME}.pt")
    assert trained.step == 2 and not torch.equal(trained.vectors, start)


def test_the_cpu_computes_in_bfloat16_where_it_has_bfloat16_instructions_and_a_safe_torch():
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to check against")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert bf16_supported("cpu") == (native and torch.__version__ >= CPU_BF16_TORCH)
    assert precision_for("cpu") == (BF16 if bf16_supported("cpu") else FP16_STORED)
    assert precision_for("meta") == FP16_STORED
    assert Precision(torch.bfloat16, torch.bfloat16).describe() == "weights bfloat16, compute bfloat16"
