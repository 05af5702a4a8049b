"""Frozen layers that save less for backward: same gradients, less memory, undone exactly."""
from __future__ import annotations

import torch
from torch import nn

from extensions_lib.train.lean_backward import FrozenConv2d, LeanGEGLU, lean_backward


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """Run fn() and return (its result, bytes of activations autograd saved for backward)."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_unet_gradients_are_bit_identical_and_less_is_saved(tiny_model):
    adapter = tiny_model("sd1")
    unet = adapter.unet
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond_start = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    originals = [(name, m) for name, m in unet.named_modules() if type(m) is nn.Conv2d or type(m).__name__ == "GEGLU"]
    gegl = sum(type(m).__name__ == "GEGLU" for _, m in originals)

    def grad_and_saved():
        cond = cond_start.clone().requires_grad_(True)
        out, saved = saved_bytes(lambda: unet(latents, torch.tensor([10, 700]), encoder_hidden_states=cond).sample)
        out.pow(2).mean().backward()
        return cond.grad, out.detach(), saved

    plain_grad, plain_out, plain_saved = grad_and_saved()
    with lean_backward(unet) as count:
        assert count == len(originals) > 10 and gegl >= 2
        assert sum(isinstance(m, LeanGEGLU) for m in unet.modules()) == gegl
        assert isinstance(unet.conv_in, FrozenConv2d)
        grad, out, saved = grad_and_saved()
    assert torch.equal(out, plain_out) and torch.equal(grad, plain_grad)
    assert saved < plain_saved * 0.8
    after = [(name, m) for name, m in unet.named_modules() if type(m) is nn.Conv2d or type(m).__name__ == "GEGLU"]
    assert after == originals
    assert not any(isinstance(m, (FrozenConv2d, LeanGEGLU)) for m in unet.modules())


def test_trainable_or_unusual_convolutions_are_left_alone():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3, padding="same"),
                          nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 1))
    model[0].requires_grad_(True)
    for m in model[1:]:
        m.requires_grad_(False)
    with lean_backward(model) as count:
        assert count == 1 and isinstance(model[3], FrozenConv2d)
        x = torch.randn(1, 2, 9, 9, requires_grad=True)
        model(x).sum().backward()  # conv 0 still trains
        assert model[0].weight.grad is not None and x.grad is not None
    assert type(model[3]) is nn.Conv2d
