"""Trainer core overhead: ``train()`` against a bare hand-written loop, and latent caching against
VAE-encoding every step, on the tiny SD1 model (CPU).

All three train the same thing (the UNet's output layer, batch 2, 64x64 images) with AdamW:

(a) ``train()`` with everything on: progress callback each step, loss CSV each step, resume state and
    snapshot every 25 steps;
(b) a bare loop over the same cached latents (no logging, no saving, no RNG bookkeeping);
(c) the naive loop: like (b) but VAE-encoding the batch's images every step (what caching avoids).

The tiny model makes the loop's own cost as visible as it can be (a real UNet step is 100-1000x longer),
so (a)/(b) is an upper bound on the overhead. Prints medians of per-step times and the ratios. Run alone:

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_train_loop.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from extensions_lib.backend.standalone import load_model  # noqa: E402
from extensions_lib.backend.tiny import make_tiny_checkpoint  # noqa: E402
from extensions_lib.train.batches import build_training_data  # noqa: E402
from extensions_lib.train.diffusion_loss import denoising_loss  # noqa: E402
from extensions_lib.train.loop import train  # noqa: E402
from extensions_lib.train.options import TrainingOptions  # noqa: E402
from train_fakes import OutputLayerMethod, make_folder  # noqa: E402

WARMUP = 3


def run_core(method, options):
    stamps = []
    train(method, options, callbacks=lambda p: stamps.append(time.perf_counter()) if p.loss is not None else None)
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return times[WARMUP:]


def run_bare(method, steps, encode_every_step):
    data, model = method.data, method.adapter
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    n, times = data.image_count, []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [(2 * step) % n, (2 * step + 1) % n]
        if encode_every_step:
            pixels = torch.stack([data.dataset.load(i)[0] for i in idx])
            with torch.no_grad():
                latents = model.encode_images(pixels).sample(g)
        else:
            latents = torch.stack([data.latents.latents(i) for i in idx])
        loss = denoising_loss(model, latents, method.cond.expand(2, -1, -1), generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[WARMUP:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_model(make_tiny_checkpoint(tmp / "tiny.safetensors", family="sd1"))
        model.unet.conv_out.requires_grad_(True)
        folder = make_folder(tmp / "data", 8)
        results = {"core": [], "bare": [], "naive": []}
        for r in range(args.rounds):
            options = TrainingOptions(data_root=str(folder), template_file="filewords", training_width=64,
                                      training_height=64, seed=r, steps=args.steps, learn_rate="0.001",
                                      batch_size=2, log_directory=str(tmp / f"logs{r}"), save_every=25,
                                      create_image_every=0, write_csv_every=1)
            method = OutputLayerMethod(build_training_data(model, options, name="", require_name=False), model)
            results["core"] += run_core(method, options)
            results["bare"] += run_bare(method, args.steps, encode_every_step=False)
            results["naive"] += run_bare(method, args.steps, encode_every_step=True)
    med = {k: statistics.median(v) * 1000 for k, v in results.items()}
    print(f"median step time (ms, tiny SD1, CPU, {args.threads} thread(s), {args.rounds}x{args.steps} steps):")
    for k in ("core", "bare", "naive"):
        print(f"  {k:5s} {med[k]:8.2f}")
    print(f"train() / bare loop            = {med['core'] / med['bare']:.3f}  (loop overhead; tiny model = upper bound)")
    print(f"naive (VAE each step) / train() = {med['naive'] / med['core']:.3f}  (what latent caching saves)")
    print("rerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_train_loop.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
