"""Low-resolution UNet layers computed from row chunks with float16-stored weights: the same results as the
float32 layers (up to summation order), the rows each layer sees found right, and everything undone bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extensions_lib.backend.standalone import load_model
from extensions_lib.backend.tiny import make_tiny_checkpoint
from extensions_lib.train import low_res_layers as lr


def half_exact_(module: nn.Module) -> nn.Module:
    """Round every floating tensor to float16 values (as a model loaded from a float16 file has)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())
    return module


@pytest.mark.parametrize("stride,padding,kernel,batch,hw", [(1, 1, 3, 1, (5, 7)), (2, 1, 3, 3, (8, 8)),
                                                             (1, 0, 1, 2, (4, 6)), (2, 0, 3, 1, (9, 9))])
def test_conv_rows_equal_torch_convolution_forward_and_backward(stride, padding, kernel, batch, hw):
    torch.manual_seed(0)
    conv = half_exact_(nn.Conv2d(6, 70, kernel, stride=stride, padding=padding)).requires_grad_(False)
    x = torch.randn(batch, 6, *hw)
    expected_x = x.clone().requires_grad_(True)
    expected = F.conv2d(expected_x, conv.weight, conv.bias, stride, padding)    # autograd's own convolution
    grad = torch.randn_like(expected)
    expected.backward(grad)
    for weight in (conv.weight.detach().clone(), conv.weight.detach().half()):    # float32, and float16 in chunks
        conv.weight.data = weight
        ours_x = x.clone().requires_grad_(True)
        ours = lr._RowsFunction.apply(ours_x, conv)
        ours.backward(grad)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)


def test_linear_rows_equal_torch_linear_over_many_chunks(monkeypatch):
    monkeypatch.setattr(lr, "CHUNK_BYTES", 7 * 4 * 4)        # chunks of 7 rows, the last one shorter
    torch.manual_seed(1)
    linear = half_exact_(nn.Linear(4, 30)).requires_grad_(False)
    x = torch.randn(2, 3, 4)
    expected_x = x.clone().requires_grad_(True)
    expected = F.linear(expected_x, linear.weight, linear.bias)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    linear.weight.data = linear.weight.data.half()
    assert len(list(lr._chunks(linear.weight))) == 5
    ours_x = x.clone().requires_grad_(True)
    ours = lr._RowsFunction.apply(ours_x, linear)
    ours.backward(grad)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_x.grad, expected_x.grad, rtol=1e-6, atol=1e-6)


def rows_seen(unet: nn.Module, run) -> dict[nn.Module, int]:
    """Independently: the rows every Linear/Conv2d multiplies, from its real input and output in a real call."""
    seen: dict[nn.Module, int] = {}

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            rows = output.shape[0] * output.shape[2] * output.shape[3]
        else:
            rows = args[0].numel() // module.in_features
        seen[module] = max(seen.get(module, 0), rows)

    handles = [m.register_forward_hook(hook) for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_probe_gives_the_rows_each_layer_sees_at_the_training_size(tiny_model, family):
    adapter = tiny_model(family)
    unet = adapter.unet
    latent_hw, batch = (24, 16), 3
    rows = lr.training_rows(unet, lr.unet_runner(adapter), latent_hw, batch)
    real = rows_seen(unet, lambda: adapter.predict(torch.zeros(batch, 4, *latent_hw), torch.tensor([500] * batch),
                                                 torch.zeros(batch, 77, adapter.context_dim)))
    assert rows == real
    assert min(rows.values()) == batch          # the time embedding: one row per image
    assert max(rows.values()) == batch * 24 * 16
    assert not any("forward" in m.__dict__ for m in unet.modules())    # stubs gone


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_block_matches_float32_and_restores_the_model_bit_for_bit(tiny_model):
    adapter = tiny_model("sd1")
    unet = adapter.unet
    before = snapshot(unet)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    try:
        half_exact_(unet).requires_grad_(False)
        exact = snapshot(unet)
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        cond0 = torch.randn(2, 77, adapter.context_dim, generator=torch.Generator().manual_seed(1))

        def output_and_grad():
            cond = cond0.clone().requires_grad_(True)
            out = adapter.predict(latents, torch.tensor([10, 700]), cond)
            out.pow(2).mean().backward()
            return out.detach(), cond.grad

        expected_out, expected_grad = output_and_grad()
        rows = lr.training_rows(unet, lr.unet_runner(adapter), (16, 16), 2)
        limit = sorted(set(rows.values()))[-2]          # every layer but those at the highest resolution
        chosen = [m for m, n in rows.items() if n <= limit and lr.can_compute_in_rows(m)]
        with lr.low_res_layers(unet, rows, limit=limit) as report:
            assert report.layers == len(chosen) > 5
            assert report.stored_half == report.layers and report.bytes_saved > 0
            assert unet.conv_in.weight.dtype == torch.float32
            half = [m for m in chosen if m.weight.dtype == torch.float16]
            assert len(half) == report.layers
            out, grad = output_and_grad()
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)
        after = snapshot(unet)
        assert all(after[k].dtype == exact[k].dtype and torch.equal(after[k], exact[k]) for k in exact)
        assert not any("forward" in m.__dict__ for m in unet.modules())
    finally:
        unet.load_state_dict(before)
        for name, p in unet.named_parameters():      # the model is shared between tests: leave it as it was
            p.requires_grad_(flags[name])


def test_weights_float16_cannot_hold_stay_float32():
    torch.manual_seed(2)
    model = nn.Sequential(nn.LayerNorm(3), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4)).requires_grad_(False)
    conv_weight = model[1].weight.detach().clone()
    with lr.low_res_layers(model, {model[1]: 4, model[2]: 4}, limit=64) as report:
        # the convolution computes from rows in float32 (faster on the CPU); the Linear gains nothing
        assert (report.layers, report.stored_half, report.bytes_saved) == (1, 0, 0)
        assert lr._uses_rows(model[1]) and model[1].weight.dtype == torch.float32
        assert "forward" not in model[2].__dict__ and model[2].weight.dtype == torch.float32
    assert "forward" not in model[1].__dict__ and torch.equal(model[1].weight, conv_weight)


def test_load_for_training_reads_low_res_layers_as_float16_and_computes_the_same(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "half.safetensors", dtype=torch.float16)
    plain = load_model(path)
    ours = lr.load_for_training(path, latent_hw=(8, 8), batch=1, limit=16)
    half = [n for n, p in ours.unet.named_parameters() if p.dtype == torch.float16]
    assert half and "conv_in.weight" not in half
    assert all(p.dtype == torch.float32 for p in ours.text_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in ours.vae.parameters())
    rows = lr.training_rows(plain.unet, lr.unet_runner(plain), (8, 8), 1)
    names = {m: n for n, m in plain.unet.named_modules()}
    expected_half = {names[m] + ".weight" for m, n in rows.items()
                     if n <= 16 and lr.can_compute_in_rows(m) and m is not plain.unet.conv_in}
    assert set(half) == expected_half
    for name, p in ours.unet.named_parameters():       # the same values, float16 where kept
        assert torch.equal(p.float(), plain.unet.get_parameter(name))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 77, plain.context_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.predict(latents, torch.tensor([300]), cond),
                                   plain.predict(latents, torch.tensor([300]), cond), rtol=1e-5, atol=1e-6)


def test_load_for_training_of_a_float32_file_is_load_model(tiny_checkpoint):
    ours = lr.load_for_training(tiny_checkpoint("sd1"), latent_hw=(8, 8))
    assert all(p.dtype == torch.float32 for m in ours.modules().values() for p in m.parameters())
    assert not any("forward" in m.__dict__ for m in ours.unet.modules())
