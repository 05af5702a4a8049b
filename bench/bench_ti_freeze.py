"""Textual-inversion step time inside the stand-in WebUI host, with the run set-up freezing the model
("after") against the model left as the host leaves it ("before": the UNet's parameters
``requires_grad=True``, as ldm leaves them, so every backward pass also computes a gradient for every UNet
weight, and the lean backward finds no frozen layer to swap).

Full-size SD1.5-architecture random weights written once as a fp16 ``.safetensors`` (about 2 GB, in a
temporary folder deleted afterwards), loaded by the stand-in host's model builder, trained through our
WebUI adapter exactly as the Train tab does (``embeddings.session.train_embedding``). Each side runs in
its own subprocess, rounds alternating. Step time is measured between the loop's progress callbacks.
Reported: median step time per side and the ratio after/before.

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_ti_freeze.py

``--model tiny`` runs the same on the tiny test model in seconds (a check of the script only).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run_side(side: str, ckpt: Path, size: int, warmup: int, steps: int, work: Path) -> dict:
    import torch

    import extensions_lib.train.setup as run_setup
    from extensions_lib.host.webui_adapter import WebUIModelAdapter
    from webui_standin.harness import standin_host

    if side == "before":  # the model as the host leaves it: nothing frozen by the run
        run_setup.frozen_model = lambda adapter: contextlib.nullcontext()
    with standin_host(work / "webui") as host:
        model = host.load_model(ckpt, cached=False)  # no second, cached copy of a full-size model
        return _train(model, WebUIModelAdapter(model, torch.device("cpu")), size, warmup, steps, work)


def _train(model, adapter, size: int, warmup: int, steps: int, work: Path) -> dict:
    from bench_textual_inversion import write_dataset
    from extensions_lib.embeddings.create import create_embedding
    from extensions_lib.embeddings.options import EmbeddingTrainOptions
    from extensions_lib.embeddings.session import train_embedding

    unet_trainable = all(p.requires_grad for p in model.model.parameters())
    write_dataset(work / "data", size, 2)
    (work / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
    create_embedding(adapter, "benchtoken", "*", 1, directory=work / "embeddings")
    options = EmbeddingTrainOptions(
        embedding_name="benchtoken", embeddings_dir=str(work / "embeddings"), data_root=str(work / "data"),
        template_file=str(work / "template.txt"), training_width=size, training_height=size,
        steps=warmup + steps, seed=0, learn_rate="0.005", save_every=0, create_image_every=0,
        write_csv_every=0, save_resume_state=False, save_training_settings=False, log_directory=str(work / "logs"))
    marks: list[float] = []
    grads: list[int] = []

    def on_step(p) -> None:
        if p.loss is not None and p.saved is None:
            marks.append(time.perf_counter())
            grads.append(sum(q.grad is not None for q in model.model.parameters()))

    train_embedding(adapter, options, callbacks=on_step)
    times = [b - a for a, b in zip(marks, marks[1:])][max(0, warmup - 1):]
    return {"step_times": times, "unet_trainable_at_load": unet_trainable, "unet_params_with_grad": max(grads)}


def spawn(side: str, args, ckpt: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--ckpt", str(ckpt), "--size", str(args.size),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    from bench_load import run_json

    return run_json(cmd, f"{side} run", cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=256, help="training images are SIZE x SIZE")
    parser.add_argument("--warmup", type=int, default=1, help="steps not timed in each run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps in each run")
    parser.add_argument("--rounds", type=int, default=2, help="subprocess runs per side, alternating")
    parser.add_argument("--side", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory(prefix=f"alchemy-bench-freeze-{args.side}-") as tmp:
            print(json.dumps(run_side(args.side, args.ckpt, args.size, args.warmup, args.steps, Path(tmp))))
        return

    with tempfile.TemporaryDirectory(prefix="alchemy-bench-freeze-") as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        if args.model == "tiny":
            from extensions_lib.backend.tiny import make_tiny_checkpoint

            make_tiny_checkpoint(ckpt, family="sd1")
        else:
            from bench_load import write_random_checkpoint

            write_random_checkpoint(ckpt)
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for i in range(args.rounds):
            for side in (["before", "after"] if i % 2 == 0 else ["after", "before"]):
                res = spawn(side, args, ckpt)
                results[side].append(res)
                print(f"round {i + 1} {side:6s}: median step {statistics.median(res['step_times']):.3f}s "
                      f"({', '.join(f'{t:.2f}' for t in res['step_times'])}); UNet params with a gradient "
                      f"after a step: {res['unet_params_with_grad']}", flush=True)
    step = {s: statistics.median([t for r in rs for t in r["step_times"]]) for s, rs in results.items()}
    import torch

    print(f"\n{args.model} SD1.5 architecture in the stand-in host, {args.size}x{args.size}, batch 1, CPU float32, "
          f"{torch.get_num_threads()} threads")
    print(f"TI step: before (UNet trainable) {step['before']:.3f}s, after (frozen by the run set-up) "
          f"{step['after']:.3f}s, after/before {step['after'] / step['before']:.3f}")
    print("\nrerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_ti_freeze.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
