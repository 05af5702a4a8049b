"""The fused backward+step trains what the plain step trains (AdamW, full fine-tune through the real
DreamBooth entry point), with far fewer gradients alive at once; it resumes exactly; and it refuses the
options that need every gradient before any update."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from extensions_lib.backend.standalone import load_model
from extensions_lib.dreambooth.memory import check_fused
from extensions_lib.dreambooth.method import train_dreambooth
from extensions_lib.dreambooth.options import DreamBoothTrainOptions
from extensions_lib.errors import AlchemyError
from extensions_lib.train.fused_step import FusedStep
from train_fakes import make_folder


def _options(tmp_path, **kw) -> DreamBoothTrainOptions:
    base = dict(model_name="subj", data_root=str(tmp_path / "inst"), instance_prompt="a photo of sks thing",
                training_width=64, training_height=64, seed=3, steps=3, learn_rate="1e-3", batch_size=1,
                log_directory=str(tmp_path / "logs"), checkpoints_dir=str(tmp_path / "ckpt"),
                lora_dir=str(tmp_path / "Lora"), save_every=0, create_image_every=0, write_csv_every=0,
                mode="full", keep_trained_weights=True, save_resume_state=False)
    base.update(kw)
    if not (tmp_path / "inst").is_dir():
        make_folder(tmp_path / "inst", 2)
    return DreamBoothTrainOptions(**base)


class _LiveGradients:
    """Counts the gradient bytes alive on `params` each time one of them is accumulated (hooks registered
    before the run's, so they see each gradient before a fused step frees it)."""

    def __init__(self, params):
        self.params = list(params)
        self.peak = 0
        self.handles = []
        for p in self.params:
            was = p.requires_grad
            p.requires_grad_(True)
            self.handles.append(p.register_post_accumulate_grad_hook(self._seen))
            p.requires_grad_(was)

    def _seen(self, _):
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live)

    def remove(self):
        for h in self.handles:
            h.remove()


def _full_run(tmp_path, ckpt, fused: bool):
    model = load_model(ckpt)
    params = list(model.unet.parameters())
    live = _LiveGradients(params)
    try:
        result = train_dreambooth(model, _options(tmp_path / ("fused" if fused else "plain"),
                                                  fused_backward_step=fused))
    finally:
        live.remove()
    weights = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    return result, weights, live.peak, params


def test_fused_full_fine_tune_equals_plain_with_fewer_live_gradients(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("sd1")
    plain, plain_w, plain_peak, params = _full_run(tmp_path, ckpt, fused=False)
    fused, fused_w, fused_peak, fused_params = _full_run(tmp_path, ckpt, fused=True)
    assert plain.step == fused.step == 3
    original = load_model(ckpt).unet.state_dict()
    assert any(not torch.equal(plain_w[k], original[k]) for k in plain_w)  # it trained
    for k in plain_w:
        torch.testing.assert_close(fused_w[k], plain_w[k], rtol=1e-5, atol=1e-7)
    for (_, a), (_, b) in zip(plain.losses, fused.losses):
        assert a == pytest.approx(b, rel=1e-5)
    total = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in fused_params)
    assert plain_peak == total  # every gradient alive before the plain step
    assert fused_peak <= largest < total / 10  # one at a time
    assert all(p.grad is None for p in fused_params)
    # the hooks came off: a later backward pass changes nothing
    model = load_model(ckpt)
    model.unet.requires_grad_(True)
    before = model.unet.conv_in.weight.detach().clone()
    cond = torch.zeros(1, 77, model.context_dim)
    model.predict(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond).mean().backward()
    assert torch.equal(model.unet.conv_in.weight, before)


def _toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _run_toy(model, optimizer, batches, lrs):
    for (x, y), lr in zip(batches, lrs):
        for g in optimizer.param_groups:
            g["lr"] = lr
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fused_step_resumes_exactly_and_follows_the_schedule():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(6)]
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 1e-3, 1e-3]

    def adamw(group):
        return torch.optim.AdamW(group, lr=1e-2, weight_decay=0.05)

    plain = _toy()
    _run_toy(plain, adamw([{"params": list(plain.parameters()), "lr": 1e-2}]), batches, lrs)

    whole = _toy()
    fused = FusedStep([{"params": list(whole.parameters()), "lr": 1e-2, "weight_decay": 0.05}], adamw)
    _run_toy(whole, fused, batches, lrs)

    first = _toy()
    half = FusedStep([{"params": list(first.parameters()), "lr": 1e-2, "weight_decay": 0.05}], adamw)
    _run_toy(first, half, batches[:3], lrs[:3])
    state = copy.deepcopy(half.state_dict())
    weights = copy.deepcopy(first.state_dict())
    half.remove()
    second = _toy(seed=5)
    second.load_state_dict(weights)
    rest = FusedStep([{"params": list(second.parameters()), "lr": 1e-2, "weight_decay": 0.05}], adamw)
    rest.load_state_dict(state)
    _run_toy(second, rest, batches[3:], lrs[3:])

    for a, b, c in zip(plain.parameters(), whole.parameters(), second.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert torch.equal(c, b)
    with pytest.raises(ValueError):
        rest.load_state_dict(adamw([{"params": list(plain.parameters())}]).state_dict())


def test_a_nonfinite_gradient_is_not_applied():
    model = nn.Linear(3, 1)
    fused = FusedStep([{"params": list(model.parameters()), "lr": 0.1}], lambda g: torch.optim.AdamW(g))
    before = model.weight.detach().clone()
    (model(torch.tensor([[float("inf"), 1.0, 1.0]])).sum() * 0 + model.weight.sum() * float("nan")).backward()
    assert torch.equal(model.weight, before) and fused.skipped == 1 and model.weight.grad is None


@pytest.mark.parametrize("change, device, words", [
    (dict(gradient_step=2), "cpu", "accumulate"),
    (dict(clip_grad_mode="norm", clip_grad_value="1.0"), "cpu", "clip"),
    (dict(mixed_precision="fp16"), "cuda", "fp16"),  # (fp16 autocast is for CUDA only)
])
def test_fused_step_refuses_what_needs_every_gradient(tmp_path, change, device, words):
    options = _options(tmp_path, fused_backward_step=True, **change)
    with pytest.raises(AlchemyError, match=words):
        check_fused(options, torch.device(device))
    check_fused(_options(tmp_path, fused_backward_step=True, mixed_precision="fp16"), torch.device("cpu"))
    check_fused(_options(tmp_path, fused_backward_step=True, mixed_precision="bf16"), torch.device("cuda"))


def test_refused_before_class_images_are_generated(tmp_path, tiny_model):
    options = _options(tmp_path, fused_backward_step=True, gradient_step=2, class_prompt="a photo of thing",
                       class_dir=str(tmp_path / "cls"), num_class_images=2)
    with pytest.raises(AlchemyError, match="accumulate"):
        train_dreambooth(tiny_model("sd1"), options)
    assert not (tmp_path / "cls").exists()
