"""Generation speed: ``alchemy txt2img`` against diffusers' ``StableDiffusionPipeline``, same file, same sampler.

Writes a full-size SD1.5-layout fp16 ``.safetensors`` with random weights (about 2 GB, in a temporary folder
deleted afterwards; see bench_load.py) and, in fresh subprocesses, alternating:

- ours: the real command line, ``extensions_lib.cli.main(["txt2img", "--ckpt", FILE, ...])``, fp32 on the CPU;
- theirs: ``StableDiffusionPipeline.from_single_file(FILE, config=<local folder>, torch_dtype=float32)`` with
  ``EulerDiscreteScheduler`` (linspace timesteps, k-diffusion's and our Euler schedule), ``safety_checker=None``.

Both: 256x256, 10 steps, CFG 7, batch 1, prompt "a photo of a cat", empty negative prompt. A forward pre-hook on
each side's UNet stamps every call; the step time is the median gap between consecutive UNet calls (so it holds
the sampler, guidance and conditioning overhead of a step, not the load, text encoding or VAE decode). Also
reported: the whole generation after the model is loaded (text encoding, steps, decode, PNG, infotext and its
checkpoint hash: a first run of ours hashes the 2 GB file once, later runs read the hash cache), and the minor
page faults per step: memory the allocator gave back and the next step faults in again (which once cost ours a
third of a step) shows there, and unlike the times it is not blurred by other load on the machine.

    .venv/bin/pip install --no-deps --target .cache/bench-deps -r bench/requirements.txt   # accelerate, once
    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_txt2img.py
"""
from __future__ import annotations

import argparse
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

from bench_load import BENCH_DEPS, child_env, require_accelerate, run_child, write_diffusers_config_folder, \
    write_random_checkpoint  # noqa: E402

PROMPT, SIZE, STEPS, CFG, SEED = "a photo of a cat", 256, 10, 7.0, 1234


def _stamp_calls(unet, stamps: list[float], faults: list[int]) -> None:
    def stamp(module, args):
        stamps.append(time.perf_counter())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    unet.register_forward_pre_hook(stamp)


def child(which: str, ckpt: str, folder: str, out_dir: str) -> None:
    import torch

    stamps: list[float] = []
    faults: list[int] = []
    marks: dict[str, float] = {}
    if which == "ours":
        from extensions_lib.backend import standalone
        from extensions_lib.cli import main

        real_load = standalone.load_model

        def load_and_stamp(*args, **kwargs):
            model = real_load(*args, **kwargs)
            _stamp_calls(model.unet, stamps, faults)
            marks["loaded"] = time.perf_counter()
            return model

        standalone.load_model = load_and_stamp
        code = main(["txt2img", "--ckpt", ckpt, "--prompt", PROMPT, "--width", str(SIZE), "--height", str(SIZE),
                     "--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED), "--sampler", "euler",
                     "--out", str(Path(out_dir) / "ours.png")])
        marks["done"] = time.perf_counter()
        if code != 0:
            raise SystemExit(f"txt2img exited {code}")
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(ckpt, config=folder, torch_dtype=torch.float32,
                                                        local_files_only=True, safety_checker=None)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        _stamp_calls(pipe.unet, stamps, faults)
        marks["loaded"] = time.perf_counter()
        image = pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED)).images[0]
        image.save(Path(out_dir) / "theirs.png")
        marks["done"] = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    step_faults = [b - a for a, b in zip(faults, faults[1:])]
    print(json.dumps({"step": statistics.median(gaps), "faults": statistics.median(step_faults), "calls": len(stamps),
                      "threads": torch.get_num_threads(),
                      "after_load": marks["done"] - marks["loaded"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs per side (median of their step medians)")
    parser.add_argument("--tmp", default=None, help="folder for the 2 GB test file (default: system temp)")
    parser.add_argument("--ckpt", default=None, help="use this SD1.5 .safetensors instead of writing a random one")
    parser.add_argument("--extra-path", default=str(BENCH_DEPS) if BENCH_DEPS.is_dir() else None,
                        help="prepended to the children's PYTHONPATH: the folder holding accelerate")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    require_accelerate(args.extra_path)
    with tempfile.TemporaryDirectory(prefix="alchemy-bench-txt2img-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        folder, cache = tmp / "diffusers-config", tmp / "cache"
        write_diffusers_config_folder(folder)
        ckpt = Path(args.ckpt) if args.ckpt else tmp / "sd15-random-fp16.safetensors"
        if not args.ckpt:
            print(f"wrote {ckpt.name}: {write_random_checkpoint(ckpt) / 2**30:.2f} GiB")
        results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for i in range(args.runs):
            for which in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                with tempfile.TemporaryDirectory() as out_dir:
                    r = run_child(__file__, [which, str(ckpt), str(folder), out_dir],
                                  dict(child_env(args.extra_path), ALCHEMY_CACHE_DIR=str(cache)))
                results[which].append(r)
                print(f"run {i + 1} {which:9s}: {r['step']:.3f} s/it (median of {r['calls'] - 1} gaps), "
                      f"{r['after_load']:.1f} s after load, {r['threads']} threads, {r['faults']:.0f} page faults/step")

    def med(which, key):
        return statistics.median(r[key] for r in results[which])

    ours, theirs = med("ours", "step"), med("diffusers", "step")
    print()
    print(f"{'':32s}{'ours':>10s}{'diffusers':>12s}")
    print(f"{'s/it (median)':32s}{ours:10.3f}{theirs:12.3f}")
    print(f"{'page faults per step (median)':32s}{med('ours', 'faults'):10.0f}{med('diffusers', 'faults'):12.0f}")
    print(f"{'after load, s (median)':32s}{med('ours', 'after_load'):10.1f}{med('diffusers', 'after_load'):12.1f}")
    if len(results["ours"]) > 1:
        print(f"ours after load, first run (hashes the file) vs later: {results['ours'][0]['after_load']:.1f} s vs "
              f"{statistics.median(r['after_load'] for r in results['ours'][1:]):.1f} s")
    print(f"step time ratio ours/diffusers (median): {ours / theirs:.3f}   target <= 1.02")
    print("rerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_txt2img.py"
          + (f" --runs {args.runs}" if args.runs != 2 else "") + (f" --ckpt {args.ckpt}" if args.ckpt else ""))


if __name__ == "__main__":
    main()
