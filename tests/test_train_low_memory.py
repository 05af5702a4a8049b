"""Low-memory training: half-stored frozen layers compute in float32 and train like the float32 model."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from extensions_lib.backend.standalone import load_model
from extensions_lib.embeddings.create import create_embedding
from extensions_lib.embeddings.method import prepare
from extensions_lib.embeddings.session import train_embedding
from extensions_lib.formats.embedding import read_embedding
from extensions_lib.train.low_memory import half_stored_layers, load_low_memory

from test_embeddings_train import NAME, concept_image, heldout_loss, make_dataset, options


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


def test_half_stored_layers_give_the_float32_results_and_restore_the_weights_exactly(fp16_checkpoint):
    unet = load_model(fp16_checkpoint).unet
    layers = _layers(unet)
    before = {name: t.clone() for name, t in unet.state_dict().items()}
    out, grad = _unet_output_and_input_grad(unet)
    with half_stored_layers(unet) as converted:
        assert converted == len(layers) > 20
        assert all(m.weight.dtype == torch.float16 for m in layers)
        assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if n.endswith("bias"))
        out_half, grad_half = _unet_output_and_input_grad(unet)
    torch.testing.assert_close(out_half, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_half, grad, rtol=1e-5, atol=1e-7)
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


def test_load_low_memory_halves_the_layer_weights_and_predicts_as_float32(fp16_checkpoint):
    full, low = load_model(fp16_checkpoint), load_low_memory(fp16_checkpoint)
    for name, module in low.modules().items():
        layer_weights = {id(m.weight) for m in _layers(module)}
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                assert tensor.dtype == (torch.float16 if id(tensor) in layer_weights else torch.float32), name
    size = lambda m: sum(t.numel() * t.element_size() for t in m.parameters())     # noqa: E731
    assert size(low.unet) < 0.55 * size(full.unet)
    assert low.dtype == torch.float32
    generator = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(low.predict(x, torch.tensor([300]), cond), full.predict(x, torch.tensor([300]), cond),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(low.decode_latents(x), full.decode_latents(x), rtol=0, atol=1e-5)


def test_low_memory_training_learns_like_float32_training(fp16_checkpoint, tmp_path):
    heldout, prompt = [concept_image(100 + i) for i in range(3)], f"a photo of {NAME}"
    results = {}
    for mode in ("float32", "loaded-low", "session-low"):
        tmp = tmp_path / mode
        make_dataset(tmp / "data", 4)
        (tmp / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
        model = load_low_memory(fp16_checkpoint) if mode == "loaded-low" else load_model(fp16_checkpoint)
        create_embedding(model, NAME, "photo", 8, directory=tmp / "emb")
        opts = options(tmp, steps=30, learn_rate="0.3", latent_sampling_method="deterministic",
                       low_memory=mode != "float32")
        method = prepare(model, opts)
        start = torch.cat([v.detach().clone() for v in method.vectors.values()])
        before = heldout_loss(model, method, heldout, prompt)
        seen = set()
        train_embedding(model, opts, method=method, callbacks=lambda p: seen.add(model.unet.time_embedding.linear_1.weight.dtype))
        assert seen == {torch.float32 if mode == "float32" else torch.float16}
        after = heldout_loss(model, method, heldout, prompt)
        assert after < 0.95 * before, (mode, before, after)
        results[mode] = read_embedding(tmp / "emb" / f"{NAME}.pt").vectors
        if mode == "session-low":       # the session put the float32 weights back
            assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    for mode in ("loaded-low", "session-low"):
        # Adam at this rate magnifies rounding-order differences; the runs must still agree to 2% of the move
        moved = (results["float32"] - start).norm()
        assert (results[mode] - results["float32"]).norm() <= 0.02 * moved, mode


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
    assert len(loaded) == 1 and loaded[0].unet.time_embedding.linear_1.weight.dtype == torch.float16
    trained = read_embedding(tmp_path / "emb" / f"{CLI_NAME}.pt")
    assert trained.step == 2 and not torch.equal(trained.vectors, start)
