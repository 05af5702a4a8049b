"""Checkpoint loading: our ``load_model`` against diffusers' ``from_single_file``, memory and time.

Writes a full-size SD1.5-layout fp16 ``.safetensors`` with random weights (about 2 GB, in a temporary
folder that is deleted afterwards) plus a local diffusers-layout config folder, then in fresh
subprocesses, alternating, measures:

(a) our peak RSS above the interpreter's (after imports; the kernel's peak counter is reset there through
    /proc/self/clear_refs, else ``ru_maxrss`` is used) against the size of the loaded weights
    (target <= 1.1x), and the RSS held once the load is done (target <= 1.02x: nothing of the file kept);
    every weight is read once after loading (safetensors tensors may be lazily memory-mapped, which would
    otherwise hide their cost);
(b) our load time against ``StableDiffusionPipeline.from_single_file(..., config=<folder>,
    torch_dtype=DTYPE, local_files_only=True)`` (target ours <= 1.2x theirs). DTYPE is float32 by default,
    what ``alchemy`` loads on the CPU (the fp16 file converted); ``--dtype float16`` loads it as stored.

Prints medians over the runs and the command to rerun. diffusers needs ``accelerate`` for its fair (meta-device)
loading path; install it once beside .venv (see bench/requirements.txt), then run the bench alone:

    .venv/bin/pip install --no-deps --target .cache/bench-deps -r bench/requirements.txt
    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_load.py
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DEPS = ROOT / ".cache" / "bench-deps"
INSTALL_DEPS = f"{Path(sys.executable).parent / 'pip'} install --no-deps --target {BENCH_DEPS} -r {ROOT / 'bench' / 'requirements.txt'}"


# --- the test file ---------------------------------------------------------------------------------------

def _sd1_ldm_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """LDM key -> (shape, safetensors dtype) of a full SD1.5 single file, from meta modules."""
    import torch

    from extensions_lib.backend import keymap
    from extensions_lib.backend.configs import build_modules, load_config

    config = load_config("sd1")
    with torch.device("meta"):
        modules = build_modules(config)
    parts = {name: {k: v for k, v in m.state_dict().items() if k != "text_model.embeddings.position_ids"}
             for name, m in modules.items()}
    parts["extra"] = {}
    ldm = keymap.convert_diffusers_state_dicts(parts, keymap.Layout.from_config(config))
    shapes = {k: (tuple(v.shape), "F16") for k, v in ldm.items()}
    shapes[keymap.CLIP_PREFIX + "text_model.embeddings.position_ids"] = ((1, 77), "I64")
    shapes["alphas_cumprod"] = ((1000,), "F32")
    return shapes


def write_random_checkpoint(path: Path, seed: int = 0) -> int:
    """Stream a random-weight fp16 SD1.5 safetensors file to `path`; returns its size in bytes."""
    import torch

    from extensions_lib.backend.configs import alphas_cumprod_from_schedule, load_config

    shapes = _sd1_ldm_shapes()
    sizes = {"F16": 2, "F32": 4, "I64": 8}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (shape, dtype) in shapes.items():
        end = offset + math.prod(shape) * sizes[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for key, (shape, dtype) in shapes.items():
            if dtype == "I64":
                tensor = torch.arange(77).reshape(shape)
            elif dtype == "F32":
                tensor = alphas_cumprod_from_schedule(load_config("sd1").scheduler).float()
            else:
                tensor = (torch.randn(shape, generator=gen) * 0.02).half()
            fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return path.stat().st_size


def write_diffusers_config_folder(folder: Path) -> None:
    """A local diffusers pipeline folder (configs + tokenizer files, no weights) for ``from_single_file``."""
    from extensions_lib.backend.configs import load_config
    from extensions_lib.backend.tokenizer import ensure_hf_clip_files

    config = load_config("sd1")
    files = {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.31.0",
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None]},
        "unet/config.json": config.unet,
        "vae/config.json": config.vae,
        "text_encoder/config.json": config.text_encoder,
        "scheduler/scheduler_config.json": dict(config.scheduler, _class_name="PNDMScheduler", skip_prk_steps=True),
        "tokenizer/tokenizer_config.json": {
            "model_max_length": 77, "do_lower_case": True, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer"},
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data, indent=2))
    tokenizer_files = ensure_hf_clip_files()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, folder / "tokenizer" / name)


# --- the measured children -----------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter here, so import-time peaks do not hide the load's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) from /proc; ru_maxrss when /proc is unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # kilobytes on Linux


def _weight_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def child(which: str, ckpt: str, config_folder: str, dtype_name: str = "float32") -> None:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from extensions_lib.backend import standalone  # noqa: F401

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = getattr(torch, dtype_name)
    exact = _reset_peak_rss()
    baseline = _rss_bytes("VmRSS" if exact else "VmHWM")
    start = time.perf_counter()
    if which == "ours":
        model = standalone.load_model(ckpt, dtype=dtype)
        modules = [model.unet, model.vae, model.text_encoder]
    else:
        pipe = StableDiffusionPipeline.from_single_file(ckpt, config=config_folder, torch_dtype=dtype,
                                                        local_files_only=True)
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
    loaded = time.perf_counter() - start
    # Tensors may still be lazily memory-mapped from the file: read every byte so both loaders are
    # measured with the weights really in memory.
    with torch.no_grad():
        for m in modules:
            for t in m.parameters():
                t.sum()
    seconds = time.perf_counter() - start
    try:
        import accelerate  # noqa: F401
        has_accelerate = True
    except ImportError:
        has_accelerate = False
    print(json.dumps({"seconds": seconds, "load_seconds": loaded, "baseline": baseline, "peak": _rss_bytes("VmHWM"),
                      "after": _rss_bytes("VmRSS"),
                      "weights": _weight_bytes(modules), "dtype": str(modules[0].dtype),
                      "accelerate": has_accelerate}))


def child_env(extra_path: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return env


def require_accelerate(extra_path: str | None) -> None:
    """Stop before the 2 GB file is written when the children would run diffusers without accelerate."""
    probe = subprocess.run([sys.executable, "-c", "import accelerate"], env=child_env(extra_path),
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SystemExit("bench_load: diffusers needs accelerate for a fair from_single_file baseline, and it is "
                         f"not importable{f' with --extra-path {extra_path}' if extra_path else ''}.\n"
                         f"Install it beside the venv with:\n  {INSTALL_DEPS}\nthen rerun this command.")


def run_json(cmd: list[str], what: str, env: dict | None = None, cwd=None) -> dict:
    """Run `cmd` (a bench's own side, in a fresh interpreter); its last stdout line is the JSON result.
    A failing run stops the bench with `what` and the end of its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    if out.returncode != 0:
        why = "killed by SIGKILL: out of memory?" if out.returncode == -9 else f"exit status {out.returncode}"
        raise SystemExit(f"{what} failed, {why} ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(script: str, child_args: list[str], env: dict) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; its last stdout line is the JSON result."""
    return run_json([sys.executable, script, "--child", *child_args], f"{child_args[0]} child", env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measurements per loader (median reported)")
    parser.add_argument("--tmp", default=None, help="folder for the 2 GB test file (default: system temp)")
    parser.add_argument("--extra-path", default=str(BENCH_DEPS) if BENCH_DEPS.is_dir() else None,
                        help="prepended to PYTHONPATH of the children: the folder holding accelerate "
                             f"(default: {BENCH_DEPS} when it exists)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="dtype both loaders produce (default float32, what alchemy uses on the CPU)")
    parser.add_argument("--child", nargs=4, metavar=("WHICH", "CKPT", "CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    require_accelerate(args.extra_path)
    with tempfile.TemporaryDirectory(prefix="alchemy-bench-load-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        ckpt, folder = tmp / "sd15-random-fp16.safetensors", tmp / "diffusers-config"
        t = time.perf_counter()
        size = write_random_checkpoint(ckpt)
        write_diffusers_config_folder(folder)
        print(f"wrote {ckpt.name}: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f}s")
        with open(ckpt, "rb") as fh:          # same warm page cache for everyone
            while fh.read(1 << 24):
                pass
        results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for i in range(args.runs):
            for which in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                r = run_child(__file__, [which, str(ckpt), str(folder), args.dtype], child_env(args.extra_path))
                results[which].append(r)
                print(f"run {i + 1} {which:9s}: {r['seconds']:6.2f}s ({r['load_seconds']:.2f}s before the first "
                      f"read of the weights), peak RSS above baseline "
                      f"{(r['peak'] - r['baseline']) / 2**30:.2f} GiB, weights {r['weights'] / 2**30:.2f} GiB "
                      f"({r['dtype']})" + ("" if which == "ours" else f", accelerate={r['accelerate']}"))

    def med(which, f):
        return statistics.median(f(r) for r in results[which])

    ours_mem = med("ours", lambda r: (r["peak"] - r["baseline"]) / r["weights"])
    theirs_mem = med("diffusers", lambda r: (r["peak"] - r["baseline"]) / r["weights"])
    ours_t, theirs_t = med("ours", lambda r: r["seconds"]), med("diffusers", lambda r: r["seconds"])
    print()
    print(f"{'':34s}{'ours':>10s}{'diffusers':>12s}")
    print(f"{'peak RSS / loaded weights (median)':34s}{ours_mem:10.3f}{theirs_mem:12.3f}   target ours <= 1.10")
    print(f"{'RSS after / loaded weights (med.)':34s}{med('ours', lambda r: (r['after'] - r['baseline']) / r['weights']):10.3f}"
          f"{med('diffusers', lambda r: (r['after'] - r['baseline']) / r['weights']):12.3f}   target ours <= 1.02")
    print(f"{'load + read weights, s (median)':34s}{ours_t:10.2f}{theirs_t:12.2f}")
    print(f"{'  of which load call, s (median)':34s}{med('ours', lambda r: r['load_seconds']):10.2f}"
          f"{med('diffusers', lambda r: r['load_seconds']):12.2f}")
    print(f"time ratio ours/diffusers (median): {ours_t / theirs_t:.3f}   target <= 1.20")
    print(f"diffusers had accelerate: {results['diffusers'][0]['accelerate']}")
    print("rerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_load.py"
          + (f" --extra-path {args.extra_path}" if args.extra_path and Path(args.extra_path) != BENCH_DEPS else "")
          + (f" --runs {args.runs}" if args.runs != 3 else "") + (f" --dtype {args.dtype}" if args.dtype != "float32" else ""))


if __name__ == "__main__":
    main()
