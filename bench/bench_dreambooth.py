"""DreamBooth training, end to end: ours against diffusers' DreamBooth examples (full fine-tune and LoRA), on a
full-size SD1.5-architecture model with random weights read from a file, 256x256, batch 1, CPU, float32.

The model file is a 2 GB fp16 LDM ``.safetensors`` (bench_load.py's writer), as users have; the diffusers
examples read a diffusers folder, so that is written from it once too (float32 ``safetensors``, what
``save_pretrained`` makes). Both are kept in ``--cache`` (default ``<tmp>/alchemy-bench-dreambooth``) so reruns
skip the writing. Each run trains on 4 instance images and, with prior preservation (on by default), 4 class
images already on disk (nothing is generated), every image SIZE x SIZE.

- ours: what ``alchemy dreambooth train`` runs: ``load_model`` from the file, then ``train_dreambooth`` (the
  function the CLI calls) with our defaults for the mode, except what is set to match theirs: resolution,
  batch 1, prior preservation and its weight 1, the learning rate (no effect on cost), no periodic saves,
  previews, CSV or resume state. Our defaults that differ from theirs and stay (the headline is our defaults
  against theirs): latents cached once per image (no VAE encode per step), each prompt encoded once (the
  text encoder is frozen), no gradient clipping (a finiteness check of the gradient norm instead),
  gradients set to None after each step, LoRA on all Linear/1x1 layers of the UNet's transformer blocks
  (kohya's choice: attention, feed-forward, proj_in/out) with alpha = rank, the VAE (and the frozen text
  encoder, its prompts encoded) moved out of memory during the steps (``offload_unused``), and, as the CLI,
  ``model_reused=False``: no copy of the original weights is kept (the process ends after the run). Step time is
  measured between the loop's per-step progress callbacks, so everything the loop does counts.
- theirs-full: a re-implementation of the training step of diffusers' ``examples/dreambooth/train_dreambooth.py``
  (v0.31.0, the diffusers version of our env) with its defaults: models ``from_pretrained`` from the folder
  (float32), text encoder not trained (``requires_grad_(False)``) and no pre-computed text embeddings (the
  prompts are tokenised and encoded every step), VAE frozen and encoding every batch
  (``latent_dist.sample()``), mixed precision none (CPU), gradient checkpointing off, no xformers (diffusers'
  default SDPA attention), torch AdamW (not 8-bit) over all UNet parameters with lr 5e-6, betas (0.9, 0.999),
  weight decay 1e-2, eps 1e-8, constant schedule, ``clip_grad_norm_`` to 1.0 every step,
  ``zero_grad(set_to_none=False)`` (``--set_grads_to_none`` off), UNet in train mode; data loaded by a
  DataLoader (shuffle, no workers) opening each image, ``exif_transpose``, RGB, Resize(SIZE, bilinear),
  RandomCrop(SIZE), ToTensor, Normalize(0.5, 0.5); prior preservation (their default is off; set to match,
  see ``--no-prior``): the class example concatenated after the instance one, prediction and target split in
  halves, loss = instance MSE + 1.0 * prior MSE. Their defaults changed to match ours: batch 1 (theirs: 4),
  resolution 256 (theirs: 512).
- theirs-lora: the same step of ``examples/dreambooth/train_dreambooth_lora.py`` (v0.31.0): every model frozen,
  peft ``LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0,
  add_k_proj, add_v_proj])`` added to the UNet (``unet.add_adapter``; text encoder not trained), AdamW over the
  LoRA parameters with lr 5e-4 and the betas/decay/eps above, ``clip_grad_norm_`` 1.0, ``zero_grad()``.
  Needs ``peft`` beside the venv (bench/requirements.txt).

Left out of both: accelerate's wrapper calls (a no-op for one CPU process), logging/trackers, validation,
checkpoints every 500 steps, and the file written at the end (ours writes its output after the last timed
step: the "end" column shows the peak including that).

Each side runs in its own fresh interpreter (peak resident memory is per process), one at a time; a side of
ours and the matching side of theirs run as an adjacent pair, the order alternating by round. Reported per
pair and as medians: step time and peak RSS of the whole process up to the end of the last step, and their
ratios ours/theirs. Sanity checks without tests: each side reports its finite losses, how many parameters it
trains, and that they moved (ours: read back from the file it wrote).

    .venv/bin/pip install --no-deps --target .cache/bench-deps -r bench/requirements.txt   # accelerate, peft
    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_dreambooth.py

``--model tiny`` (or ``--size tiny``) runs it on the tiny test model in a minute or two (a check of the script
only). A full fine-tune holds 16-20 GB per process: run full size only under the lock, and little else beside
it; before each full-size side the bench waits (``--wait`` seconds) for the memory that side needs and stops
if it does not come. On two shared cores a full-size run takes about 5-8 minutes per side (``--modes full``
or ``--modes lora`` and ``--rounds 1`` shorten it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
THEIR_LR = {"full": 5e-6, "lora": 5e-4}
LORA_RANK = 4
UNET_PROBE = ("conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight")
"""A trained UNet weight by its diffusers name and its LDM key in our written checkpoint."""


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def write_images(folder: Path, size: int, count: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(seed + i).random((size, size, 3)) * 255
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")


# ---- ours ---------------------------------------------------------------------------------------------------

def run_ours(mode: str, args, work: Path, ckpt: Path) -> dict:
    import torch

    from extensions_lib.backend.standalone import load_model
    from extensions_lib.dreambooth.method import train_dreambooth
    from extensions_lib.dreambooth.options import DreamBoothTrainOptions

    adapter = load_model(ckpt)
    built_rss = _status_bytes("VmRSS")
    probe_before = dict(adapter.modules()["unet"].named_parameters())[UNET_PROBE[0]].detach().clone()
    options = DreamBoothTrainOptions(
        model_name="bench", mode=mode, data_root=str(work / "instance"), instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT if args.prior else "", class_dir=str(work / "class") if args.prior else "",
        num_class_images=args.images, prior_loss_weight=1.0, training_width=args.resolution,
        training_height=args.resolution, batch_size=1, steps=args.warmup + args.steps, seed=0,
        learn_rate=str(THEIR_LR[mode]), lora_rank=LORA_RANK, lora_alpha=float(LORA_RANK), save_every=0,
        create_image_every=0, write_csv_every=0, save_resume_state=False, save_training_settings=False,
        log_directory=str(work / "logs"), checkpoints_dir=str(work / "checkpoints"), lora_dir=str(work / "lora"))
    marks: list[float] = []
    peaks: list[int] = []

    def on_step(p) -> None:
        if p.loss is not None and p.saved is None:   # a training step (not the start or the final report)
            marks.append(time.perf_counter())
            peaks.append(_status_bytes("VmHWM"))

    result = train_dreambooth(adapter, options, callbacks=on_step, model_reused=False)  # as the CLI calls it
    # marks[k]: the end of step k+1, so the differences time steps 2..N; the first `warmup - 1` go too.
    times = [b - a for a, b in zip(marks, marks[1:])][max(0, args.warmup - 1):]
    trained, moved = _ours_trained(mode, adapter, result.final_path, probe_before)
    return {"step_times": times, "peak_rss": peaks[-1], "end_peak_rss": _status_bytes("VmHWM"),
            "built_rss": built_rss, "losses": [loss for _, loss in result.losses], "trained": trained,
            "moved": moved}


def _ours_trained(mode: str, adapter, path: Path, probe_before) -> tuple[int, float]:
    """(trained parameter count, largest change) read from the file written: the LoRA's up weights start
    at zero; the full checkpoint's probe weight against its value before training (the loaded model gets
    its original weights back after the run)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        if mode == "lora":
            trained = sum(fh.get_slice(k).get_shape()[0] * fh.get_slice(k).get_shape()[1]
                          for k in keys if k.endswith((".lora_up.weight", ".lora_down.weight")))
            moved = max(float(fh.get_tensor(k).abs().max()) for k in keys if k.endswith(".lora_up.weight"))
            return trained, moved
        after = fh.get_tensor(UNET_PROBE[1]).float()
    trained = sum(p.numel() for p in adapter.modules()["unet"].parameters())
    return trained, float((after - probe_before).abs().max())


# ---- theirs: the diffusers DreamBooth examples' step ---------------------------------------------------------

class TheirDataset:
    """DreamBoothDataset of the examples: instance image and prompt ids, plus a class image and prompt ids."""

    def __init__(self, instance_dir: Path, class_dir: Path | None, tokenizer, size: int):
        from torchvision import transforms

        self.instances = sorted(instance_dir.iterdir())
        self.classes = sorted(class_dir.iterdir()) if class_dir is not None else None
        self.tokenizer = tokenizer
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomCrop(size), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes or []))

    def _image(self, path: Path):
        from PIL import Image
        from PIL.ImageOps import exif_transpose

        image = exif_transpose(Image.open(path))
        return self.transform(image if image.mode == "RGB" else image.convert("RGB"))

    def _ids(self, prompt: str):
        return self.tokenizer(prompt, truncation=True, padding="max_length",
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    def __getitem__(self, index: int) -> dict:
        example = {"instance_images": self._image(self.instances[index % len(self.instances)]),
                   "instance_prompt_ids": self._ids(INSTANCE_PROMPT)}
        if self.classes is not None:
            example["class_images"] = self._image(self.classes[index % len(self.classes)])
            example["class_prompt_ids"] = self._ids(CLASS_PROMPT)
        return example


def their_collate(examples: list[dict], prior: bool) -> dict:
    import torch

    ids = [e["instance_prompt_ids"] for e in examples] + ([e["class_prompt_ids"] for e in examples] if prior else [])
    pixels = [e["instance_images"] for e in examples] + ([e["class_images"] for e in examples] if prior else [])
    return {"input_ids": torch.cat(ids), "pixel_values": torch.stack(pixels).float()}


def run_theirs(mode: str, args, work: Path, folder: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from bench_textual_inversion import load_theirs
    from extensions_lib.backend.tokenizer import make_tokenizer

    torch.manual_seed(0)
    config, parts = load_theirs(folder)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    built_rss = _status_bytes("VmRSS")
    tokenizer = make_tokenizer("clip").wrapped
    noise_scheduler = DDPMScheduler.from_config(config.scheduler)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        probes = [p for n, p in unet.named_parameters() if p.requires_grad and "lora_B" in n]   # start at zero
    else:
        params = list(unet.parameters())
        probes = [dict(unet.named_parameters())[UNET_PROBE[0]]]
    probes_before = [p.detach().clone() for p in probes]
    optimizer = torch.optim.AdamW(params, lr=THEIR_LR[mode], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    dataset = TheirDataset(work / "instance", work / "class" if args.prior else None, tokenizer, args.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0,
                                         collate_fn=lambda examples: their_collate(examples, args.prior))
    total = args.warmup + args.steps
    times, losses, peak = [], [], 0
    unet.train()
    while len(times) < total:                      # epochs
        batches = iter(loader)
        while len(times) < total:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(batch["input_ids"], attention_mask=None, return_dict=False)[0]
            pred = unet(noisy, timesteps, hidden, class_labels=None, return_dict=False)[0]
            target = noise
            if args.prior:
                pred, pred_prior = torch.chunk(pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                prior_loss = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean") + 1.0 * prior_loss
            else:
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=mode == "lora")
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            peak = _status_bytes("VmHWM")
    return {"step_times": times[args.warmup:], "peak_rss": peak, "end_peak_rss": _status_bytes("VmHWM"),
            "built_rss": built_rss, "losses": losses, "trained": sum(p.numel() for p in params),
            "moved": max(float((p.detach() - b).abs().max()) for p, b in zip(probes, probes_before))}


# ---- driver -----------------------------------------------------------------------------------------------------

def run_side(args) -> None:
    files = Path(args.files)
    owner, mode = args.side.split("-")
    with tempfile.TemporaryDirectory(prefix=f"alchemy-bench-db-{args.side}-") as tmp:
        work = Path(tmp)
        write_images(work / "instance", args.resolution, args.images, seed=0)
        if args.prior:
            write_images(work / "class", args.resolution, args.images, seed=1000)
        random.seed(0)
        if owner == "ours":
            result = run_ours(mode, args, work, files / "model.safetensors")
        else:
            result = run_theirs(mode, args, work, files / "diffusers")
    print(json.dumps(result))


def cached_files(model: str, cache: Path) -> Path:
    """The model file and the diffusers folder for `model`, written once into `cache` (by a child process, so
    the memory of the model loaded to write the folder goes with it)."""
    import subprocess

    folder = cache / model
    if (folder / "complete").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{model}-partial-", dir=cache))
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write-files", str(partial), "--model", model], check=True, cwd=ROOT)
    (partial / "complete").write_text("")
    partial.rename(folder)
    print(f"wrote the model file and the diffusers folder into {folder} in {time.perf_counter() - started:.0f}s",
          flush=True)
    return folder


NEEDS_GIB = {"ours-full": 17.5, "theirs-full": 17.0, "ours-lora": 7.0, "theirs-lora": 7.0}
"""Memory a full-size side may take (a full fine-tune: weights, gradients and AdamW state of the UNet, and in
ours a copy of its original weights), waited for so a run does not push the other users of the machine out."""


def wait_for_memory(gib: float, patience_s: float) -> None:
    """Wait (up to `patience_s`) until the kernel reports `gib` GiB available; stop the bench if it never is."""
    def available() -> float:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 2**20

    deadline, told = time.monotonic() + patience_s, False
    while available() < gib and time.monotonic() < deadline:
        if not told:
            print(f"waiting for {gib:.0f} GiB of free memory ({available():.1f} GiB available now)", flush=True)
            told = True
        time.sleep(15)
    if available() < gib:
        raise SystemExit(f"bench_dreambooth: {available():.1f} GiB of memory available after waiting "
                         f"{patience_s:.0f}s, a side needs about {gib:.0f} GiB; rerun when the machine is quieter")


def spawn(side: str, args, files: Path) -> dict:
    from bench_load import BENCH_DEPS, child_env, run_json

    if args.model == "full":
        wait_for_memory(NEEDS_GIB[side], args.wait)

    cmd = [sys.executable, __file__, "--side", side, "--resolution", str(args.resolution), "--images",
           str(args.images), "--warmup", str(args.warmup), "--steps", str(args.steps), "--files", str(files)]
    cmd += [] if args.prior else ["--no-prior"]
    return run_json(cmd, f"{side} run", child_env(str(BENCH_DEPS) if BENCH_DEPS.is_dir() else None), cwd=ROOT)


def sanity(side: str, res: dict) -> list[str]:
    problems = []
    if not res["losses"] or not all(x == x and abs(x) != float("inf") for x in res["losses"]):
        problems.append(f"{side}: losses not finite: {res['losses']}")
    if not res["moved"] > 0:
        problems.append(f"{side}: the trained weights did not change")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "--size", dest="model", choices=["full", "tiny"], default="full",
                        help="full: SD1.5 architecture (about 16 GB per full fine-tune process); tiny: the test model")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--resolution", type=int, default=256, help="training images are RESOLUTION squared")
    parser.add_argument("--images", type=int, default=4, help="instance images (and as many class images)")
    parser.add_argument("--no-prior", dest="prior", action="store_false",
                        help="without prior preservation (diffusers' default); by default both sides use it")
    parser.add_argument("--warmup", type=int, default=1, help="steps not timed in each run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps in each run")
    parser.add_argument("--rounds", type=int, default=2, help="adjacent ours/theirs pairs per mode")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "alchemy-bench-dreambooth"),
                        help="folder keeping the model file and the diffusers folder between runs")
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for the memory a full-size side needs before giving up")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--write-files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_files:
        from bench_textual_inversion import write_files

        write_files(args.model, Path(args.write_files))
        return
    if args.side:
        run_side(args)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"full", "lora"} or not modes:
        parser.error("--modes takes full and/or lora")
    from bench_load import BENCH_DEPS, require_accelerate

    deps = str(BENCH_DEPS) if BENCH_DEPS.is_dir() else None
    require_accelerate(deps)          # from_pretrained's fair (meta-device) path
    if "lora" in modes:
        _require_peft(deps)
    files = cached_files(args.model, Path(args.cache))
    results: dict[str, list[dict]] = {}
    problems: list[str] = []
    for mode in modes:
        for i in range(args.rounds):
            pair = (f"theirs-{mode}", f"ours-{mode}")
            for side in (pair if i % 2 == 0 else pair[::-1]):
                res = spawn(side, args, files)
                results.setdefault(side, []).append(res)
                problems += sanity(side, res)
                print(f"{mode} round {i + 1} {side:12s}: median step {statistics.median(res['step_times']):.3f}s "
                      f"({', '.join(f'{t:.2f}' for t in res['step_times'])}), peak RSS {res['peak_rss'] / 2**30:.2f} "
                      f"GiB (end {res['end_peak_rss'] / 2**30:.2f}, after load {res['built_rss'] / 2**30:.2f}), "
                      f"trains {res['trained'] / 1e6:.3f}M params, moved {res['moved']:.2e}, losses "
                      f"{', '.join(f'{x:.3f}' for x in res['losses'])}", flush=True)
            ours, theirs = results[pair[1]][-1], results[pair[0]][-1]
            if mode == "full" and ours["trained"] != theirs["trained"]:
                problems.append(f"full: ours trains {ours['trained']} parameters, theirs {theirs['trained']}")
            print(f"{mode} pair {i + 1}: step ours/theirs "
                  f"{statistics.median(ours['step_times']) / statistics.median(theirs['step_times']):.3f}, "
                  f"peak RSS ours/theirs {ours['peak_rss'] / theirs['peak_rss']:.3f}", flush=True)

    print(f"\n{args.model} SD1.5 architecture, {args.resolution}x{args.resolution}, batch 1, prior preservation "
          f"{'on' if args.prior else 'off'}, CPU float32, {os.cpu_count()} CPUs, {args.rounds} pairs per mode, "
          f"{args.steps} timed steps per run")
    print(f"{'':13s}{'step':>9s}{'peak RSS':>13s}{'end peak':>13s}{'step/theirs':>13s}{'RSS/theirs':>12s}"
          f"{'pair ratios step; RSS':>26s}")
    for mode in modes:
        theirs_step = statistics.median(t for r in results[f"theirs-{mode}"] for t in r["step_times"])
        theirs_rss = statistics.median(r["peak_rss"] for r in results[f"theirs-{mode}"])
        for side in (f"theirs-{mode}", f"ours-{mode}"):
            rs = results[side]
            step = statistics.median(t for r in rs for t in r["step_times"])
            rss = statistics.median(r["peak_rss"] for r in rs)
            end = statistics.median(r["end_peak_rss"] for r in rs)
            pairs = ""
            if side.startswith("ours"):
                theirs = results[f"theirs-{mode}"]
                pairs = "; ".join(f"{statistics.median(o['step_times']) / statistics.median(t['step_times']):.2f} "
                                  f"{o['peak_rss'] / t['peak_rss']:.2f}" for o, t in zip(rs, theirs))
            print(f"{side:13s}{step:>8.3f}s{rss / 2**30:>9.2f} GiB{end / 2**30:>9.2f} GiB{step / theirs_step:>13.3f}"
                  f"{rss / theirs_rss:>12.3f}  {pairs}")
    print("peak RSS: whole process up to the end of the last step; end peak: to the end of the run "
          "(ours writes its file there)")
    print("sanity: " + ("every side trained (finite losses, trained weights changed)" if not problems
                        else "PROBLEMS: " + "; ".join(problems)))
    print("\nrerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_dreambooth.py "
          + " ".join(sys.argv[1:]))
    if problems:
        raise SystemExit(1)


def _require_peft(extra_path: str | None) -> None:
    import subprocess

    from bench_load import INSTALL_DEPS, child_env

    probe = subprocess.run([sys.executable, "-c", "import peft"], env=child_env(extra_path), capture_output=True,
                           check=False)
    if probe.returncode != 0:
        raise SystemExit(f"bench_dreambooth: the diffusers LoRA example needs peft, which is not importable.\n"
                         f"Install it beside the venv with:\n  {INSTALL_DEPS}\nthen rerun this command.")


if __name__ == "__main__":
    main()
