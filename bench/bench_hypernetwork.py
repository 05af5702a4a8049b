"""Hypernetwork costs on a full-size SD1.5-architecture model with random weights, CPU.

(a) Inference: one denoising step (classifier-free guidance, so the UNet runs on a batch of 2) at
    512x512 (64x64 latents) with and without one loaded ``1, 2, 1`` hypernetwork (default: the WebUI's
    Create defaults, widths 768, 320, 640, 1280, activation "linear"). Target: at most 3% slower.
    The hypernetwork is loaded once (``apply_hypernetworks``, as a generation does before its steps); the
    plain side runs the same model with the patched projections' forwards parked for the call (exactly the
    unpatched ``nn.Linear.forward``). An affine hypernetwork ("linear", no layer norm) is folded into
    ``to_k``/``to_v`` at its first step: that one-time cost is printed separately, and ``--activation relu``
    measures the unfolded path (modules run, cross-attention context computed once per width).
    Besides the timings it prints the ratio of floating-point operations per step (torch's
    FlopCounterMode on the meta device, after the first step), which no other load on the machine can disturb.
(b) Training: one hypernetwork training step as ``HypernetworkMethod`` takes it (latents cached, model
    parameters frozen) against the naive step: the image VAE-encoded every step and the UNet's
    parameters left requiring gradients, everything else the same (same cached text conditioning, same
    AdamW over the hypernetwork). Target: ours / naive at most 0.7. Default 256x256 to keep it short on
    CPU (``--train-size 512`` for the full size).

Timings alternate between the two sides (ABBA order) after a warm-up of each; medians are reported.
Run alone (other benchmarks take the same lock):

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_hypernetwork.py
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from extensions_lib.backend.configs import alphas_cumprod_from_schedule, load_config  # noqa: E402
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork  # noqa: E402
from extensions_lib.hypernetworks.patch import apply_hypernetworks  # noqa: E402

STEP_TARGET = 1.03
TRAIN_TARGET = 0.7


def bench_hypernetwork(sizes: list[int], activation: str) -> Hypernetwork:
    torch.manual_seed(0)
    return Hypernetwork.create("bench", sizes, Architecture((1, 2, 1), activation))


def alternate(a, b, runs: int) -> tuple[list[float], list[float]]:
    """Time a() and b() `runs` times each in ABBA order after one warm-up of each."""
    a(), b()
    times: dict[object, list[float]] = {a: [], b: []}
    for i in range(runs):
        for fn in ((a, b) if i % 2 == 0 else (b, a)):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return times[a], times[b]


def _attention(unet):
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]


# ---- (a) one denoising step ----------------------------------------------------------------------------

class UNetAdapter:
    """Just enough of a ModelAdapter for the sampler's Denoiser: a bare diffusers UNet."""

    prediction_type = "eps"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, unet):
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod_from_schedule(load_config("sd1").scheduler).float()

    def predict(self, noisy, timesteps, cond):
        return self.unet(noisy, timesteps, encoder_hidden_states=cond).sample

    def attention_modules(self):
        return _attention(self.unet)


def sd1_unet(device: str = "cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_config("sd1").component("unet"))
    return unet.eval().requires_grad_(False)


def flops_ratio(hn: Hypernetwork, batch: int = 2) -> float:
    """Floating-point operations of a patched UNet step over an unpatched one (meta tensors: no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = sd1_unet("meta")
    x, t = torch.empty(batch, 4, 64, 64, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta")
    context = torch.empty(batch, 77, 768, device="meta")

    def count() -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, encoder_hidden_states=context)
        return counter.get_total_flops()

    base = count()
    meta_hn = bench_hypernetwork(hn.sizes, hn.arch.activation_func).to("meta")
    with apply_hypernetworks([(meta_hn, 1.0)], _attention(unet)):
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=context)  # the first step folds (once per load): not a step's cost
        patched = count()
    return patched / base


@contextlib.contextmanager
def parked(attention):
    """The unpatched model while a patch stays loaded: each patched projection's instance ``forward`` (which
    keeps its fold) is taken off for the block, so the class's ``nn.Linear.forward`` runs, then put back."""
    projections = [m for _, attn in attention for m in (attn.to_k, attn.to_v) if "forward" in vars(m)]
    saved = [vars(m).pop("forward") for m in projections]
    try:
        yield
    finally:
        for m, forward in zip(projections, saved):
            m.forward = forward


def bench_step(sizes: list[int], activation: str, runs: int) -> dict:
    from extensions_lib.sampling.denoiser import Denoiser, guided

    hn = bench_hypernetwork(sizes, activation)
    flops = flops_ratio(hn)
    adapter = UNetAdapter(sd1_unet())
    attention = adapter.attention_modules()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g) * 14.6
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    model_fn = guided(Denoiser(adapter), cond, uncond, 7.0)
    sigma = torch.tensor(14.6)

    with torch.no_grad():
        model_fn(x, sigma)  # the model's own first-call costs, so that `first` below is the patch's
    with apply_hypernetworks([(hn, 1.0)], attention) as patch:
        start = time.perf_counter()
        with torch.no_grad():
            model_fn(x, sigma)  # the first step with the hypernetwork: includes folding it, once per load
        first = time.perf_counter() - start

        def plain():
            with parked(attention), torch.no_grad():
                model_fn(x, sigma)

        def patched():
            with torch.no_grad():
                model_fn(x, sigma)

        base, with_hn = alternate(plain, patched, runs)
        applied = len(patch.applied)
    return {"base": base, "hn": with_hn, "flops": flops, "first": first, "layers": applied}


# ---- (b) one training step -----------------------------------------------------------------------------

def sd1_model():
    """A StandaloneModel of the full SD1.5 architecture with random weights (nothing read from disk)."""
    from extensions_lib.backend.standalone import StandaloneModel
    from extensions_lib.backend.tiny import build_modules

    config = load_config("sd1")
    parts = {name: m.eval().requires_grad_(False) for name, m in build_modules(config).items()}
    return StandaloneModel(path=Path("random-sd15.safetensors"), config=config, parts=parts,
                           alphas_cumprod=alphas_cumprod_from_schedule(config.scheduler).float(),
                           device=torch.device("cpu"))


def bench_train(size: int, sizes: list[int], activation: str, runs: int) -> dict:
    import numpy as np
    from PIL import Image

    from extensions_lib.hypernetworks.file import write_hypernetwork
    from extensions_lib.hypernetworks.method import HypernetworkMethod, attach
    from extensions_lib.train.setup import frozen_model
    from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
    from extensions_lib.train.batches import build_training_data
    from extensions_lib.train.diffusion_loss import denoising_loss
    from extensions_lib.train.provenance import collect

    model = sd1_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "data" / "img.png")
        (root / "data" / "img.txt").write_text("a photo of something")
        hn = bench_hypernetwork(sizes, activation)
        path = root / "bench.pt"
        write_hypernetwork(hn, path)
        opts = HypernetworkTrainOptions(data_root=str(root / "data"), template_file="filewords", training_width=size,
                                        training_height=size, seed=0)
        data = build_training_data(model, opts, name="bench", require_name=False)
        with frozen_model(model):
            patch = attach(hn, model, path, print)
            hn.train()
            try:
                method = HypernetworkMethod(model, hn, data, opts, collect(model, data.dataset), path)
                optimizer = torch.optim.AdamW(method.parameters(), lr=1e-5)
                rng, gen = random.Random(0), torch.Generator().manual_seed(0)
                image = data.dataset.load(0)[0][None]  # decoded once: the naive side only re-encodes it

                def ours():
                    batch = data.make_batch((0,), rng, gen)
                    method.loss(batch, 0).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                def naive():
                    model.unet.requires_grad_(True)
                    try:
                        batch = data.make_batch((0,), rng, gen)
                        with torch.no_grad():
                            latents = model.encode_images(image).sample(gen)
                        loss = denoising_loss(model, latents, method.conditioning(batch.prompts), generator=gen)
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    finally:
                        model.unet.requires_grad_(False)
                        for p in model.unet.parameters():
                            p.grad = None

                fast, slow = alternate(ours, naive, runs)
            finally:
                patch.unpatch()
    return {"ours": fast, "naive": slow}


# ---- report --------------------------------------------------------------------------------------------

def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s (min {min(values):.3f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["step", "train", "both"], default="both")
    parser.add_argument("--runs", type=int, default=6, help="timed runs per side (median reported)")
    parser.add_argument("--sizes", default="768,320,640,1280", help="module widths of the hypernetwork")
    parser.add_argument("--activation", default="linear", help="activation of the hypernetwork (WebUI name)")
    parser.add_argument("--train-size", type=int, default=256, help="training image size in pixels")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"hypernetwork 1, 2, 1 ({args.activation}, widths {sizes}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU; medians of {args.runs} alternating runs")
    ok = True
    if args.part in ("step", "both"):
        r = bench_step(sizes, args.activation, args.runs)
        ratio = statistics.median(r["hn"]) / statistics.median(r["base"])
        pairs = statistics.median(h / b for h, b in zip(r["hn"], r["base"]))
        print("(a) denoising step, SD1.5 UNet, 512x512 (64x64 latents), CFG batch 2")
        print(f"    without hypernetwork: {_fmt(r['base'])}")
        print(f"    with hypernetwork:    {_fmt(r['hn'])} (acting on {r['layers']} attention layers)")
        print(f"    first step after loading it: {r['first']:.3f} s (one-time cost of loading, e.g. folding an affine "
              f"hypernetwork: {r['first'] - statistics.median(r['hn']):.3f} s)")
        print(f"    ratio {ratio:.3f} (median of per-run ratios {pairs:.3f}; of minimums "
              f"{min(r['hn']) / min(r['base']):.3f}; FLOPs ratio {r['flops']:.4f}); "
              f"target <= {STEP_TARGET}: {'met' if ratio <= STEP_TARGET else 'NOT met'}")
        ok &= ratio <= STEP_TARGET
        gc.collect()
    if args.part in ("train", "both"):
        r = bench_train(args.train_size, sizes, args.activation, args.runs)
        ratio = statistics.median(r["ours"]) / statistics.median(r["naive"])
        print(f"(b) training step, SD1.5, {args.train_size}x{args.train_size}, batch 1")
        print(f"    ours (cached latents, frozen model): {_fmt(r['ours'])}")
        print(f"    naive (VAE every step, UNet params requiring grad): {_fmt(r['naive'])}")
        print(f"    ratio {ratio:.3f} (of minimums {min(r['ours']) / min(r['naive']):.3f}); "
              f"target <= {TRAIN_TARGET}: {'met' if ratio <= TRAIN_TARGET else 'NOT met'}")
        ok &= ratio <= TRAIN_TARGET
    rerun = " ".join(sys.argv[1:])
    print(f"rerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_hypernetwork.py {rerun}".rstrip())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
