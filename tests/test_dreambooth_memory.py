"""Gradient checkpointing really recomputes (and changes no gradient); 8-bit AdamW only when usable."""
from __future__ import annotations

import types

import torch

from extensions_lib.dreambooth.memory import adamw_class, checkpointing
from extensions_lib.train.setup import RunSetup


def _grads(model, latents, cond):
    unet = model.unet
    unet.requires_grad_(True)  # as in full fine-tuning (the run set-up restores the flags)
    out = model.predict(latents, torch.tensor([300, 600]), cond)
    out.pow(2).mean().backward()
    grads = [unet.conv_in.weight.grad.clone(), unet.down_blocks[0].attentions[0].proj_out.weight.grad.clone()]
    unet.zero_grad(set_to_none=True)
    return grads


def test_checkpointing_recomputes_blocks_with_equal_gradients(tiny_model):
    model = tiny_model("sd1")
    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, model.context_dim, generator=g)
    calls = []
    block = model.unet.down_blocks[0].resnets[0].conv1
    handle = block.register_forward_hook(lambda *a: calls.append(1))
    try:
        with RunSetup(model):
            plain = _grads(model, latents, cond)
            plain_calls = len(calls)
        calls.clear()
        with RunSetup(model) as setup:
            setup.undo_with(checkpointing(model.unet))
            checked = _grads(model, latents, cond)
            checked_calls = len(calls)
    finally:
        handle.remove()
    assert plain_calls == 1 and checked_calls == 2  # run again in the backward pass
    for a, b in zip(plain, checked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not model.unet.training and not any(getattr(m, "gradient_checkpointing", False) for m in model.unet.modules())
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_8bit_adamw_only_on_cuda_with_bitsandbytes():
    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit="bnb-adamw8bit"))

    def have(name):
        return fake

    def missing(name):
        raise ImportError(name)

    assert adamw_class(True, torch.device("cuda"), have) == "bnb-adamw8bit"
    assert adamw_class(True, torch.device("cuda"), missing) is torch.optim.AdamW
    assert adamw_class(True, torch.device("cpu"), have) is torch.optim.AdamW
    assert adamw_class(False, torch.device("cuda"), have) is torch.optim.AdamW
