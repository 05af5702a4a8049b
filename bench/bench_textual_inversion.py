"""Textual-inversion training, end to end: ours against the diffusers example's, on a full-size
SD1.5-architecture model with random weights read from a file, 256x256, batch 1, CPU, float32.

The model file is a 2 GB fp16 LDM ``.safetensors`` (written by bench_load.py's writer into a temporary folder
and deleted afterwards), as users have; the diffusers example reads a diffusers folder, so that is written
from it once too (float32 ``safetensors``, what ``save_pretrained`` makes).

- ours: what ``alchemy embedding train`` runs: ``load_for_training`` from the file (``load_model`` with the
  UNet's low-resolution layers read as training uses them), then
  :class:`~extensions_lib.embeddings.session.TrainingSession` and the trainer core's ``train()`` loop. What
  makes it cheaper: latents cached once per image; only the embedding's vectors trainable (no gradient,
  AdamW state or saved copy of the 49408-row matrix); the VAE and the unused token-embedding rows out of
  memory while training; frozen convolutions and GEGLUs saving less for backward; the layers that see 64
  positions or fewer (most of the UNet's weights) holding the file's float16 weights and computing from row
  chunks, faster than oneDNN's convolution there (``train/low_res_layers.py``); glibc keeping freed memory
  for the next step (``M_TOP_PAD``; see ``--theirs-malloc``). Step time is measured between the loop's
  per-step progress callbacks, so everything the loop does counts. The load's own peak and the memory held
  after it are reported against the size of the loaded weights.
- ours-low: the same with ``--low-memory`` (``load_low_memory``: frozen UNet/text-encoder layer weights kept
  in 16 bits; in bfloat16 and computed in bfloat16 on a CPU with AVX512-BF16/AMX, else in float16 and computed
  in float32 layer by layer; ``--low-memory-precision`` forces one).
- theirs: a faithful re-implementation of diffusers' ``examples/textual_inversion/textual_inversion.py``
  (defaults, no mixed precision): the models loaded with ``from_pretrained`` from the diffusers folder, a
  placeholder token added to the tokenizer and the embedding matrix resized; the whole token-embedding
  matrix handed to AdamW (weight decay 1e-2); every step loads and preprocesses the image, VAE-encodes it,
  encodes the prompt, runs the UNet, back-propagates, steps the optimizer and restores every row but the
  new token's from a saved copy.

Each side runs in its own subprocess (peak resident memory is per process), several rounds alternating so
load from other processes on the machine hits all alike. Reported: median step time and peak RSS per side
and their ratios to theirs. Targets: defaults time <= 0.6, peak RSS <= 0.8; low memory time <= 0.7, peak
RSS <= 0.6; our load's peak <= 1.1x and RSS after it <= 1.02x the loaded weights.

    .venv/bin/pip install --no-deps --target .cache/bench-deps -r bench/requirements.txt   # accelerate, once
    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_textual_inversion.py

``--phases`` prints, per run, the peak and current RSS at the end of each phase (imports, load, latents,
set-up, each step, finish) and the phase during which the peak was set (from the kernel's VmHWM, read at
each boundary: exact, no sampling). Measured (defaults, SD1 at 256 px): ours peaks in the training steps
and at their end, not in the load; theirs in its first steps.

``--source built`` is the former stand-in: both sides build the modules in memory instead of loading a
file (training only). ``--model tiny`` runs the comparison on the tiny test model in seconds (a check of the
script only). ``--theirs-malloc`` adds theirs with the same glibc setting as ours, for reference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = {"ours": (0.6, 0.8), "ours-low": (0.7, 0.6)}     # (step time, peak RSS) as ratios to theirs
LOAD_PEAK_TARGET, LOAD_AFTER_TARGET = 1.1, 1.02
PROMPT_TEMPLATE = "a photo of [name]"
TOKEN = "benchtoken"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakPhases:
    """Which phase of a run set its peak RSS: the kernel's peak counter (VmHWM) read at each phase's end;
    the phase during which it last rose holds the peak. Costs one /proc read per mark, no sampling thread."""

    def __init__(self):
        self.marks: list[tuple[str, int, int]] = []        # (phase that just ended, VmHWM, VmRSS)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, _status_bytes("VmHWM"), _status_bytes("VmRSS")))

    def summary(self) -> dict:
        top = max((h for _, h, _ in self.marks), default=0)    # the counter may have been reset in between
        # The first phase ending within 16 MiB of the top (the counter creeps up by pages afterwards).
        peak_phase = next((p for p, h, _ in self.marks if h >= top - 2**24), None)
        return {"peak_phase": peak_phase, "phases": [[p, h, r] for p, h, r in self.marks]}


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

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def load_ours(ckpt: Path, low_memory: bool, phases: PeakPhases, precision: str = "auto",
              size: int = 256) -> tuple[object, dict]:
    """The model as the CLI loads it, with the load's own memory: peak and after, above the RSS before it."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (imports out of the measurement)
    from transformers import CLIPTextModel  # noqa: F401

    from extensions_lib.train.low_memory import BF16, FP16_STORED, load_low_memory
    from extensions_lib.train.low_res_layers import load_for_training

    torch.ones(8) @ torch.ones(8)
    phases.mark("imports")
    before_peak = _status_bytes("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:      # restart the peak counter: the load's own peak
        fh.write("5")
    baseline = _status_bytes("VmRSS")
    adapter = (load_low_memory(ckpt, precision={"auto": None, "bf16": BF16, "fp16": FP16_STORED}[precision])
               if low_memory else load_for_training(ckpt, latent_hw=(size // 8, size // 8)))
    phases.mark("load")
    tensors = [t for m in adapter.modules().values() for t in [*m.parameters(), *m.buffers()]]
    load = {"load_peak": _status_bytes("VmHWM") - baseline, "load_after": _status_bytes("VmRSS") - baseline,
            "weights": sum(t.numel() * t.element_size() for t in tensors), "before_peak": before_peak}
    return adapter, load


def run_ours(model: str, size: int, images: int, warmup: int, steps: int, work: Path, ckpt: Path | None = None,
             low_memory: bool = False, precision: str = "auto") -> dict:
    import torch

    from extensions_lib.backend.configs import alphas_cumprod_from_schedule
    from extensions_lib.backend.standalone import StandaloneModel
    from extensions_lib.embeddings.create import create_embedding
    from extensions_lib.embeddings.session import train_embedding
    from extensions_lib.embeddings.options import EmbeddingTrainOptions

    phases = PeakPhases()
    if ckpt is not None:
        adapter, load = load_ours(ckpt, low_memory, phases, precision, size)
    else:
        config, parts = build_parts(model)
        adapter = StandaloneModel(path=work / f"random-{model}.safetensors", config=config, parts=parts,
                                  alphas_cumprod=alphas_cumprod_from_schedule(config.scheduler).float(),
                                  device=torch.device("cpu"))
        load = {}
    built_rss = current_rss_bytes()
    write_dataset(work / "data", size, images)
    (work / "template.txt").write_text(PROMPT_TEMPLATE + "\n", encoding="utf-8")
    create_embedding(adapter, TOKEN, "*", 1, directory=work / "embeddings")
    options = EmbeddingTrainOptions(
        embedding_name=TOKEN, embeddings_dir=str(work / "embeddings"), data_root=str(work / "data"),
        template_file=str(work / "template.txt"), training_width=size, training_height=size,
        steps=warmup + steps, seed=0, learn_rate="0.005", save_every=0, create_image_every=0,
        write_csv_every=0, save_resume_state=False, save_training_settings=False,
        log_directory=str(work / "logs"), low_memory=low_memory)
    marks: list[float] = []
    phases.mark("embedding created")

    def on_step(p) -> None:
        if p.loss is not None and p.saved is None:
            marks.append(time.perf_counter())
            phases.mark(f"step {p.step}")
        elif p.step == 0:
            phases.mark("set-up")

    train_embedding(adapter, options, callbacks=on_step,
                    on_progress=lambda done, count: phases.mark("latents") if done == count else None)
    phases.mark("finish")
    times = [b - a for a, b in zip(marks, marks[1:])][max(0, warmup - 1):]
    peak = max(_status_bytes("VmHWM"), load.pop("before_peak", 0)) if load else peak_rss_bytes()
    low = {"precision": adapter.low_memory.describe()} if getattr(adapter, "low_memory", None) else {}
    return {"step_times": times, "peak_rss": peak, "built_rss": built_rss, **load, **low, **phases.summary()}


# ---- theirs: the diffusers textual-inversion example's step --------------------------------------------------

def load_theirs(folder: Path):
    """The example's loading: each model ``from_pretrained`` its subfolder (float32, as saved)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from extensions_lib.backend.configs import load_config

    parts = {"text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
             "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
             "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet")}
    config = load_config("sd1")
    return config, parts


def run_theirs(model: str, size: int, images: int, warmup: int, steps: int, work: Path, folder: Path | None = None,
               keep_freed_memory: bool = False) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from extensions_lib.backend.tokenizer import make_tokenizer

    phases = PeakPhases()
    phases.mark("imports")
    config, parts = load_theirs(folder) if folder is not None else build_parts(model)
    phases.mark("load")
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
    phases.mark("set-up")
    with keeping_freed_memory() if keep_freed_memory else contextlib.nullcontext():
        for i in range(warmup + steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
            phases.mark(f"step {i + 1}")
    return {"step_times": times[warmup:], "peak_rss": peak_rss_bytes(), "built_rss": built_rss, **phases.summary()}


# ---- driver -----------------------------------------------------------------------------------------------------

def run_side(args) -> None:
    files = Path(args.files) if args.files else None
    with tempfile.TemporaryDirectory(prefix=f"alchemy-bench-ti-{args.side}-") as tmp:
        sizes = (args.model, args.size, args.images, args.warmup, args.steps, Path(tmp))
        if args.side in ("ours", "ours-low"):
            result = run_ours(*sizes, ckpt=files / "model.safetensors" if files else None,
                              low_memory=args.side == "ours-low", precision=args.low_memory_precision)
        else:
            result = run_theirs(*sizes, folder=files / "diffusers" if files else None,
                                keep_freed_memory=args.side == "theirs-malloc")
    print(json.dumps(result))


def write_files(model: str, folder: Path) -> None:
    """The model file (random weights, fp16, LDM layout) and the diffusers folder the example reads."""
    from bench_load import write_random_checkpoint

    from extensions_lib.backend.standalone import load_model
    from extensions_lib.backend.tiny import make_tiny_checkpoint

    ckpt = folder / "model.safetensors"
    if model == "tiny":
        make_tiny_checkpoint(ckpt)
    else:
        write_random_checkpoint(ckpt)
    loaded = load_model(ckpt)
    for name, module in loaded.modules().items():
        module.save_pretrained(folder / "diffusers" / name, safe_serialization=True)


def spawn(side: str, args, files: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--size", str(args.size),
           "--images", str(args.images), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--files", str(files)] if files else []
    cmd += ["--low-memory-precision", args.low_memory_precision] if side == "ours-low" else []
    from bench_load import BENCH_DEPS, child_env, run_json

    return run_json(cmd, f"{side} run", child_env(str(BENCH_DEPS) if BENCH_DEPS.is_dir() else None), cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--source", choices=["file", "built"], default="file",
                        help="file: both sides load the model from files (end to end); built: both build it in "
                             "memory (the former stand-in, training only)")
    parser.add_argument("--size", type=int, default=256, help="training images are SIZE x SIZE")
    parser.add_argument("--images", type=int, default=2, help="dataset images")
    parser.add_argument("--warmup", type=int, default=1, help="steps not timed in each run")
    parser.add_argument("--steps", type=int, default=4, help="timed steps in each run")
    parser.add_argument("--rounds", type=int, default=2, help="subprocess runs per side, alternating")
    parser.add_argument("--no-low-memory", action="store_true", help="leave out the --low-memory side")
    parser.add_argument("--low-memory-precision", choices=["auto", "bf16", "fp16"], default="auto",
                        help="the --low-memory side's layer weights/compute: auto (bf16/bf16 where the CPU has "
                             "bfloat16 instructions, else fp16/fp32, as the option picks), bf16, fp16 (fp16/fp32)")
    parser.add_argument("--theirs-malloc", action="store_true",
                        help="also time theirs with ours' glibc setting (M_TOP_PAD), for reference")
    parser.add_argument("--phases", action="store_true",
                        help="print each run's peak and current RSS at the end of each phase (load, latents, steps)")
    parser.add_argument("--tmp", default=None, help="folder for the model files (default: system temp)")
    parser.add_argument("--side", choices=["ours", "ours-low", "theirs", "theirs-malloc"], help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    if args.source == "file":
        from bench_load import BENCH_DEPS, require_accelerate

        require_accelerate(str(BENCH_DEPS) if BENCH_DEPS.is_dir() else None)   # from_pretrained's fair path
    sides = ["theirs", "ours"] + ([] if args.no_low_memory else ["ours-low"]) + \
        (["theirs-malloc"] if args.theirs_malloc else [])
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="alchemy-bench-ti-files-", dir=args.tmp) as tmp:
        files = None
        if args.source == "file":
            files = Path(tmp)
            started = time.perf_counter()
            write_files(args.model, files)
            print(f"wrote the model file and the diffusers folder in {time.perf_counter() - started:.0f}s", flush=True)
        for i in range(args.rounds):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                res = spawn(side, args, files)
                results[side].append(res)
                load = (f", load: peak {res['load_peak'] / res['weights']:.3f}x / after {res['load_after'] / res['weights']:.3f}x "
                        f"the {res['weights'] / 2**30:.2f} GiB loaded" if "load_peak" in res else "")
                load += f", {res['precision']}" if "precision" in res else ""
                print(f"round {i + 1} {side:13s}: median step {statistics.median(res['step_times']):.3f}s "
                      f"({', '.join(f'{t:.2f}' for t in res['step_times'])}), peak RSS {res['peak_rss'] / 2**30:.2f} GiB "
                      f"(after model build {res['built_rss'] / 2**30:.2f} GiB){load}", flush=True)
                if args.phases and "phases" in res:
                    print("    peak RSS / RSS at the end of each phase (GiB): " + "; ".join(
                        f"{p} {h / 2**30:.2f}/{r / 2**30:.2f}" for p, h, r in res["phases"]) +
                        f"  -> peak set during: {res['peak_phase']}", flush=True)
    step = {s: statistics.median([t for r in rs for t in r["step_times"]]) for s, rs in results.items()}
    rss = {s: statistics.median([r["peak_rss"] for r in rs]) for s, rs in results.items()}
    print(f"\n{args.model} SD1.5 architecture, {args.size}x{args.size}, batch 1, CPU float32, "
          f"{torch_threads()} threads, models {'loaded from files' if files else 'built in memory'}")
    print(f"{'':22s}{'step':>9s}{'peak RSS':>12s}{'step/theirs':>13s}{'RSS/theirs':>12s}{'targets':>14s}")
    for side in sides:
        t_ratio, m_ratio = step[side] / step["theirs"], rss[side] / rss["theirs"]
        target = TARGETS.get(side)
        verdict = (f"{target[0]:>6} {target[1]:>5}  " + ("ok" if t_ratio <= target[0] and m_ratio <= target[1]
                                                         else "MISSED")) if target else ""
        print(f"{side:22s}{step[side]:>8.3f}s{rss[side] / 2**30:>8.2f} GiB{t_ratio:>13.3f}{m_ratio:>12.3f}  {verdict}")
    for side in ("ours", "ours-low"):
        if side in results and "load_peak" in results[side][0]:
            peak = statistics.median(r["load_peak"] / r["weights"] for r in results[side])
            after = statistics.median(r["load_after"] / r["weights"] for r in results[side])
            print(f"{side} load: peak {peak:.3f}x (target <= {LOAD_PEAK_TARGET}), after {after:.3f}x (target <= "
                  f"{LOAD_AFTER_TARGET}) the loaded weights, "
                  f"{statistics.median(r['weights'] for r in results[side]) / 2**30:.2f} GiB")
    print("\nrerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_textual_inversion.py "
          + " ".join(a for a in sys.argv[1:]))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
