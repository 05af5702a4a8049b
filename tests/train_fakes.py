"""Small stand-ins for the trainer tests: a fake ModelAdapter, image folders and toy training methods."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extensions_lib.adapter import LatentDistribution
from extensions_lib.train.provenance import Provenance


def scaled_linear_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class FakeAdapter:
    """Encodes by 8x8 average pooling (+ a 4th channel), predicts with a fixed 1x1 conv; counts encodes."""

    family = "sd1"
    prediction_type = "eps"
    context_dim = 8
    checkpoint_name = "fake-model"
    checkpoint_hash = "0123456789"
    vae_scale_factor = 0.5
    device = torch.device("cpu")
    dtype = torch.float32
    moves_parts = False

    def __init__(self, std: float = 0.1):
        self.std = std
        self.encoded_images = 0
        self.encode_calls = 0
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        g = torch.Generator().manual_seed(123)
        self.conv = torch.randn(4, 4, generator=g) * 0.3

    def encode_images(self, images: torch.Tensor) -> LatentDistribution:
        self.encode_calls += 1
        self.encoded_images += images.shape[0]
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        mean = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
        return LatentDistribution(mean, torch.full_like(mean, self.std), self.vae_scale_factor)

    def predict(self, noisy, timesteps, cond):
        out = torch.einsum("oc,bchw->bohw", self.conv, noisy)
        return out + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    @contextlib.contextmanager
    def use(self, *parts):
        yield

    def modules(self):
        return {}


def write_image(path: Path, size=(64, 64), color=(200, 30, 30), alpha: np.ndarray | None = None,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    if alpha is not None:
        Image.fromarray(np.dstack([arr, alpha.astype(np.uint8)]), "RGBA").save(path)
    else:
        Image.fromarray(arr, "RGB").save(path)
    return path


def make_folder(root: Path, n: int = 4, captions: bool = True, size=(64, 64)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    for i in range(n):
        write_image(root / f"img{i}.png", size=size, color=colors[i % len(colors)], seed=i)
        if captions:
            (root / f"img{i}.txt").write_text(f"thing {i}, red, round, tag{i}", encoding="utf-8")
    return root


def fake_provenance(data, note: str = "") -> Provenance:
    return Provenance("fake-model", "0123456789", data.image_count, data.content_hash, note)


# ---- toy data and methods ------------------------------------------------------------------------------

class ToyData:
    """A BatchSource of fixed vectors x (N, d_in) with targets W* x: the loop sees it like image data."""

    def __init__(self, n=8, d_in=6, d_out=3, batch_size=2, gradient_step=1, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(1000 + n)
        self.x = torch.randn(n, d_in, generator=g, dtype=dtype)
        self.w_true = torch.randn(d_out, d_in, generator=g, dtype=dtype)
        self.y = self.x @ self.w_true.T
        self.batch_size, self.gradient_step, self.seed = batch_size, gradient_step, seed
        self.image_count = n
        self.content_hash = f"toy-{n}-{d_in}-{d_out}"

    @property
    def steps_per_epoch(self):
        from extensions_lib.train.batches import steps_per_epoch
        return steps_per_epoch([list(range(self.image_count))], self.batch_size, self.gradient_step)

    def epoch(self, epoch):
        from extensions_lib.train.batches import plan_epoch
        return plan_epoch([list(range(self.image_count))], self.batch_size, self.gradient_step, self.seed, epoch)

    def make_batch(self, key, rng, generator):
        from extensions_lib.train.batches import Batch
        idx = list(key)
        return Batch(latents=self.x[idx], prompts=[f"p{rng.random():.6f}" for _ in idx], captions=[""] * len(idx),
                     indices=tuple(idx), weights=self.y[idx], generator=generator)


class MethodBase:
    """Shared plumbing of the toy methods: saving records calls, previews write a file."""

    def __init__(self, name, data):
        self.name = name
        self.data = data
        self.provenance = fake_provenance(data)
        self.saved: list[tuple[Path, int, dict | None]] = []
        self.previews: list[int] = []

    def output_path(self, log_dir, step):
        return log_dir / "snapshots" / (f"{self.name}-{step}.pt" if step is not None else f"{self.name}.pt")

    def save(self, path, step, optimizer_state=None):
        from extensions_lib.atomic import atomic_path
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().clone() for k, v in self.state_dict().items()} | {"step": step}, tmp)
        self.saved.append((path, step, optimizer_state))

    def preview(self, step, directory):
        directory.mkdir(parents=True, exist_ok=True)
        torch.randn(3)  # draws from the global RNG, which the loop must put back
        path = directory / f"{self.name}-{step}.txt"
        path.write_text(str(step))
        self.previews.append(step)
        return path


class LinearMethod(MethodBase):
    """Fits W so that W x ≈ y (targets carried in batch.weights). Loss = mean squared error."""

    def __init__(self, data: ToyData, name="linear", nan_at=(), inf_grad_at=(), nan_from=None, dropout=0.0,
                 noise=0.0):
        """nan_at / inf_grad_at: steps whose first try gives a NaN loss / an infinite gradient;
        nan_from: every try from this step on gives NaN."""
        super().__init__(name, data)
        self.w = torch.zeros_like(data.w_true, requires_grad=True)
        self.nan_at, self.inf_grad_at, self.dropout, self.noise = set(nan_at), set(inf_grad_at), dropout, noise
        self.nan_from = nan_from
        self.loss_steps: list[int] = []

    def parameters(self):
        return [self.w]

    def loss(self, batch, step):
        self.loss_steps.append(step)
        first_try = self.loss_steps.count(step) == 1
        x, y = batch.latents, batch.weights
        if self.noise:
            y = y + self.noise * torch.randn(y.shape, generator=batch.generator, dtype=y.dtype)
        w = self.w
        if step in self.inf_grad_at and first_try:
            w = self.w * 1.0
            w.register_hook(lambda g: g * float("inf"))  # the loss stays finite, the gradient does not
        pred = x @ w.T
        if self.dropout:
            pred = torch.nn.functional.dropout(pred, self.dropout)  # global RNG
        loss = ((pred - y) ** 2).mean()
        if (step in self.nan_at and first_try) or (self.nan_from is not None and step >= self.nan_from):
            return loss * float("nan")
        return loss

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])


class CondMethod(MethodBase):
    """Learns a conditioning vector through the denoising loss of an adapter (the path TI takes).

    The prompt length nudges the conditioning, so the prompt order (tag shuffle, dropout, template
    line) shows in the result; hypernetwork-like dropout draws from the global RNG."""

    def __init__(self, data, adapter, name="cond", dropout=0.1, min_snr_gamma=0.0):
        super().__init__(name, data)
        self.adapter = adapter
        self.vec = torch.zeros(1, 1, adapter.context_dim, requires_grad=True)
        self.dropout = dropout
        self.min_snr_gamma = min_snr_gamma

    def parameters(self):
        return [self.vec]

    def cond(self, prompts):
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.float32).reshape(-1, 1, 1) * 1e-3
        cond = self.vec.expand(len(prompts), 4, -1) + lengths
        return torch.nn.functional.dropout(cond, self.dropout) if self.dropout else cond

    def loss(self, batch, step):
        from extensions_lib.train.diffusion_loss import denoising_loss
        return denoising_loss(self.adapter, batch.latents, self.cond(batch.prompts), generator=batch.generator,
                              weight=batch.weights, min_snr_gamma=self.min_snr_gamma)

    def state_dict(self):
        return {"vec": self.vec.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.vec.copy_(state["vec"])


class OutputLayerMethod(MethodBase):
    """Trains the UNet's output layer of a real adapter through ``adapter.predict`` (as a DreamBooth-style
    method trains UNet weights). The caller switches the layer's ``requires_grad`` on and restores it."""

    def __init__(self, data, adapter):
        from extensions_lib.train.provenance import collect
        super().__init__("outlayer", data)
        self.adapter = adapter
        self.provenance = collect(adapter, data.dataset, method="test")
        self.layer = adapter.unet.conv_out
        self.cond = torch.zeros(1, 77, adapter.context_dim)

    def parameters(self):
        return list(self.layer.parameters())

    def loss(self, batch, step):
        from extensions_lib.train.diffusion_loss import denoising_loss
        return denoising_loss(self.adapter, batch.latents, self.cond.expand(len(batch.prompts), -1, -1),
                              generator=batch.generator, weight=batch.weights)

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.layer.state_dict().items()}

    def load_state_dict(self, state):
        self.layer.load_state_dict(state)  # copies into the layer's own tensors, as the loop expects
