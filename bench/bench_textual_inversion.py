"""Textual-inversion training step: ours against the diffusers example's, on a full-size SD1.5-architecture
model with random weights, 256x256, batch 1, CPU, float32.

- ours: ``alchemy embedding train`` as it runs: :class:`~extensions_lib.embeddings.method.TrainingSession`
  and the trainer core's ``train()`` loop. What makes it cheaper: latents cached once per image; only
  the embedding's vectors trainable (no gradient, AdamW state or saved copy of the 49408-row matrix);
  the VAE and the unused token-embedding rows out of memory while training; frozen convolutions and
  GEGLUs saving less for backward; glibc keeping freed memory for the next step (``M_TOP_PAD``; see
  ``--theirs-malloc`` for how much of the time that alone is worth). Step time is measured between the
  loop's per-step progress callbacks, so everything the loop does counts.
- theirs: a faithful re-implementation of one step of diffusers' ``examples/textual_inversion/
  textual_inversion.py`` (defaults, no mixed precision): a placeholder token added to the tokenizer and
  the embedding matrix resized; the whole token-embedding matrix handed to AdamW (weight decay 1e-2);
  every step loads and preprocesses the image, VAE-encodes it, encodes the prompt, runs the UNet,
  back-propagates, steps the optimizer and restores every row but the new token's from a saved copy.

Each side runs in its own subprocess (peak resident memory is per process), several rounds alternating
theirs/ours so load from other processes on the machine hits both alike. Reported: median step time and
peak RSS per side and their ratios (ours / theirs). Targets: time <= 0.7, peak RSS <= 0.8.

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_textual_inversion.py

``--model tiny`` runs the same comparison on the tiny test model in seconds (a check of the script only).
``--theirs-malloc`` adds a third side: theirs with the same glibc setting as ours, for reference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_TARGET = 0.7
RSS_TARGET = 0.8
PROMPT_TEMPLATE = "a photo of [name]"
TOKEN = "benchtoken"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- the model (same construction on both sides) ---------------------------------------------------------

def build_parts(model: str):
    """Random-weight diffusers/transformers modules of the SD1.5 architecture (or the tiny test one),
    frozen and in eval mode, as a checkpoint loader would hand them over."""
    import torch

    from extensions_lib.backend.configs import load_config
    from extensions_lib.backend.tiny import build_modules, tiny_config

    torch.manual_seed(0)
    config = load_config("sd1")
    if model == "tiny":
        config = tiny_config(config)
    parts = build_modules(config)
    generator = torch.Generator().manual_seed(0)
    for module in parts.values():
        module.requires_grad_(False)
        module.eval()
        # Default init leaves every norm at weight 1, bias 0: the text encoder's output rows then average
        # exactly 0 and the WebUI's emphasis renormalisation divides 0 by 0. Trained models have neither.
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.ndim == 1 and "norm" in name:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return config, parts


def write_dataset(folder: Path, size: int, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        path = folder / f"{i:02d}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# ---- ours ---------------------------------------------------------------------------------------------------

def run_ours(model: str, size: int, images: int, warmup: int, steps: int, work: Path) -> dict:
    import torch

    from extensions_lib.backend.configs import alphas_cumprod_from_schedule
    from extensions_lib.backend.standalone import StandaloneModel
    from extensions_lib.embeddings.create import create_embedding
    from extensions_lib.embeddings.session import train_embedding
    from extensions_lib.embeddings.options import EmbeddingTrainOptions

    config, parts = build_parts(model)
    adapter = StandaloneModel(path=work / f"random-{model}.safetensors", config=config, parts=parts,
                              alphas_cumprod=alphas_cumprod_from_schedule(config.scheduler).float(),
                              device=torch.device("cpu"))
    built_rss = current_rss_bytes()
    write_dataset(work / "data", size, images)
    (work / "template.txt").write_text(PROMPT_TEMPLATE + "\n", encoding="utf-8")
    create_embedding(adapter, TOKEN, "*", 1, directory=work / "embeddings")
    options = EmbeddingTrainOptions(
        embedding_name=TOKEN, embeddings_dir=str(work / "embeddings"), data_root=str(work / "data"),
        template_file=str(work / "template.txt"), training_width=size, training_height=size,
        steps=warmup + steps, seed=0, learn_rate="0.005", save_every=0, create_image_every=0,
        write_csv_every=0, save_resume_state=False, save_training_settings=False,
        log_directory=str(work / "logs"))
    marks: list[float] = []
    train_embedding(adapter, options, callbacks=lambda p: marks.append(time.perf_counter()) if p.loss is not None
                    and p.saved is None else None)
    times = [b - a for a, b in zip(marks, marks[1:])][max(0, warmup - 1):]
    return {"step_times": times, "peak_rss": peak_rss_bytes(), "built_rss": built_rss}


# ---- theirs: the diffusers textual-inversion example's step --------------------------------------------------

def run_theirs(model: str, size: int, images: int, warmup: int, steps: int, work: Path,
               keep_freed_memory: bool = False) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from extensions_lib.backend.tokenizer import make_tokenizer

    config, parts = build_parts(model)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    built_rss = current_rss_bytes()
    paths = write_dataset(work / "data", size, images)
    tokenizer = make_tokenizer("clip").wrapped
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)

    # Add the placeholder token and start it from the initializer token's embedding.
    tokenizer.add_tokens([f"<{TOKEN}>"])
    initializer_id = tokenizer.encode("*", add_special_tokens=False)[0]
    placeholder_ids = tokenizer.convert_tokens_to_ids([f"<{TOKEN}>"])
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_ids:
            token_embeds[token_id] = token_embeds[initializer_id].clone()

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.text_model.encoder.requires_grad_(False)
    text_encoder.text_model.final_layer_norm.requires_grad_(False)
    text_encoder.text_model.embeddings.position_embedding.requires_grad_(False)
    text_encoder.get_input_embeddings().weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=0.005,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
    text_encoder.train()
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def batch(i: int) -> dict:
        # TextualInversionDataset.__getitem__: prompt, tokenize, load, resize, flip, normalise.
        text = PROMPT_TEMPLATE.replace("[name]", f"<{TOKEN}>")
        input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids
        image = Image.open(paths[i % len(paths)]).convert("RGB").resize((size, size), resample=Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return {"input_ids": input_ids, "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1)[None]}

    def step(i: int) -> None:
        b = batch(i)
        latents = vae.encode(b["pixel_values"]).latent_dist.sample(generator=generator).detach()
        latents = latents * config.scale_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(b["input_ids"])[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
        index_no_updates[min(placeholder_ids): max(placeholder_ids) + 1] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]

    from extensions_lib.train.cpu_memory import keeping_freed_memory

    times = []
    with keeping_freed_memory() if keep_freed_memory else contextlib.nullcontext():
        for i in range(warmup + steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
    return {"step_times": times[warmup:], "peak_rss": peak_rss_bytes(), "built_rss": built_rss}


# ---- driver -----------------------------------------------------------------------------------------------------

def run_side(args) -> None:
    with tempfile.TemporaryDirectory(prefix=f"alchemy-bench-ti-{args.side}-") as tmp:
        sizes = (args.model, args.size, args.images, args.warmup, args.steps, Path(tmp))
        if args.side == "ours":
            result = run_ours(*sizes)
        else:
            result = run_theirs(*sizes, keep_freed_memory=args.side == "theirs-malloc")
    print(json.dumps(result))


def spawn(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--size", str(args.size),
           "--images", str(args.images), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{side} run failed ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=256, help="training images are SIZE x SIZE")
    parser.add_argument("--images", type=int, default=2, help="dataset images")
    parser.add_argument("--warmup", type=int, default=1, help="steps not timed in each run")
    parser.add_argument("--steps", type=int, default=4, help="timed steps in each run")
    parser.add_argument("--rounds", type=int, default=2, help="subprocess runs per side, alternating")
    parser.add_argument("--theirs-malloc", action="store_true",
                        help="also time theirs with ours' glibc setting (M_TOP_PAD), for reference")
    parser.add_argument("--side", choices=["ours", "theirs", "theirs-malloc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    sides = ["theirs", "ours"] + (["theirs-malloc"] if args.theirs_malloc else [])
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.rounds):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            res = spawn(side, args)
            results[side].append(res)
            print(f"round {i + 1} {side:13s}: median step {statistics.median(res['step_times']):.3f}s "
                  f"({', '.join(f'{t:.2f}' for t in res['step_times'])}), peak RSS {res['peak_rss'] / 2**30:.2f} GiB "
                  f"(after model build {res['built_rss'] / 2**30:.2f} GiB)", flush=True)
    step = {s: statistics.median([t for r in rs for t in r["step_times"]]) for s, rs in results.items()}
    rss = {s: statistics.median([r["peak_rss"] for r in rs]) for s, rs in results.items()}
    time_ratio, rss_ratio = step["ours"] / step["theirs"], rss["ours"] / rss["theirs"]
    print(f"\n{args.model} SD1.5 architecture, {args.size}x{args.size}, batch 1, CPU float32, "
          f"{torch_threads()} threads")
    print(f"{'':14s}{'theirs (diffusers)':>20s}{'ours':>12s}{'ours/theirs':>14s}{'target':>9s}")
    print(f"{'step time':14s}{step['theirs']:>19.3f}s{step['ours']:>11.3f}s{time_ratio:>14.3f}{TIME_TARGET:>9}"
          f"  {'ok' if time_ratio <= TIME_TARGET else 'MISSED'}")
    print(f"{'peak RSS':14s}{rss['theirs'] / 2**30:>16.2f} GiB{rss['ours'] / 2**30:>8.2f} GiB{rss_ratio:>14.3f}"
          f"{RSS_TARGET:>9}  {'ok' if rss_ratio <= RSS_TARGET else 'MISSED'}")
    if args.theirs_malloc:
        tuned = step["theirs-malloc"]
        print(f"theirs with ours' glibc setting: step {tuned:.3f}s, ours/that {step['ours'] / tuned:.3f} "
              f"(peak RSS {rss['theirs-malloc'] / 2**30:.2f} GiB)")
    print("\nrerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_textual_inversion.py "
          + " ".join(a for a in sys.argv[1:]))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
