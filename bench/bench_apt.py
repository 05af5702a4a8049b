"""APT training step: one UNet call on the doubled batch (ours, "fused") against the naive way (a text-encoder call
and a UNet call per prompt set), plus the peak memory of a reconstruction-loss step with and without decoder
checkpointing.

Every run goes through ``alchemy apt train``'s entry point (:func:`extensions_lib.apt.session.train_apt`'s session
and the trainer core's loop) on a model loaded from a real checkpoint file (random weights, written once to
``--cache``), CPU float32. "naive" differs only in the method's loss: it encodes the negative and the positive
prompts separately and runs the UNet twice (``guided_prediction(fused=False)``). The two alternate step by step
within one run (even steps fused, odd steps naive), so load from other processes on the machine hits both alike;
each step is timed between the loop's progress callbacks, and the reported ratio is the median over adjacent
(fused, naive) pairs. Target: fused/naive time <= 0.8. The reconstruction runs are separate processes (peak RSS
is per process).

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_apt.py

``--model tiny`` runs the same on the tiny test model in seconds (a check of the script only).
``--device cuda`` runs it on a GPU with the model in the file's half precision (as ``alchemy apt train --device
cuda`` loads it) and also reports the reconstruction runs' device peak memory; the target is meant for a GPU,
where one call on the doubled batch uses the device better than two (on the CPU the UNet is compute bound).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_TARGET = 0.8
TOKEN = "benchapt"


def checkpoint(model: str, cache: Path) -> Path:
    """The random-weight SD1.5-architecture checkpoint (fp16 on disk, loaded as float32), written once."""
    from extensions_lib.backend.tiny import make_tiny_checkpoint
    import torch

    path = cache / f"apt-bench-{model}.safetensors"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        make_tiny_checkpoint(path, "sd1", tiny=model == "tiny", dtype=torch.float16)
    return path


def current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def naive_loss(method):
    """The method's loss computed the naive way: two text-encoder calls, two UNet calls."""
    from extensions_lib.apt.guided import apt_loss
    from extensions_lib.prompt import encode_prompts

    def loss(batch, step):
        o = method.options
        cond_neg, cond_pos = (encode_prompts(method.adapter, prompts, clip_skip=o.clip_skip, matcher=method.matcher)
                              for prompts in (batch.negative_prompts, batch.prompts))
        on_device = batch.to(method.device)
        return apt_loss(method.adapter, on_device.latents, cond_neg, cond_pos, method.cfg, generator=batch.generator,
                        weight=on_device.weights, pixels=batch.pixels,
                        reconstruction_weight=o.reconstruction_weight if o.reconstruction else 0.0, fused=False)

    return loss


def run_side(side: str, args, work: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from extensions_lib.apt.create import create_pair
    from extensions_lib.apt.method import prepare
    from extensions_lib.apt.options import AptCreateOptions, AptTrainOptions
    from extensions_lib.apt.session import AptSession
    from extensions_lib.backend.standalone import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    # float32 on the CPU; elsewhere what `alchemy apt train --device ...` loads (the file's half precision)
    adapter = load_model(checkpoint(args.model, Path(args.cache)), device=args.device,
                         dtype=None if cuda else torch.float32)
    built_rss = current_rss_bytes()
    (work / "data").mkdir()
    for i in range(args.images):
        pixels = (np.random.default_rng(i).random((args.size, args.size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(work / "data" / f"{i:02d}.png")
    (work / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
    create_pair(adapter, AptCreateOptions(name=TOKEN, seed=0), directory=work / "embeddings")
    total = (2 if side == "paired" else 1) * (args.warmup + args.steps)  # steps in this run
    options = AptTrainOptions(
        embedding_name=TOKEN, embeddings_dir=str(work / "embeddings"), data_root=str(work / "data"),
        template_file=str(work / "template.txt"), training_width=args.size, training_height=args.size,
        batch_size=args.batch, steps=total, seed=0, save_every=0, create_image_every=0,
        write_csv_every=0, save_resume_state=False, save_training_settings=False, log_directory=str(work / "logs"),
        reconstruction=side.startswith("rec"), decoder_checkpointing=side == "rec")
    marks: list[float] = []
    with AptSession(adapter, options) as session:
        method = session.prepare()
        if side == "paired":
            fused, naive = method.loss, naive_loss(method)
            method.loss = lambda batch, step: (naive if step % 2 else fused)(batch, step)
        def mark(p) -> None:
            if p.saved is None or p.step == 0:
                if cuda:
                    torch.cuda.synchronize()  # a step ends when the device is done with it
                marks.append(time.perf_counter())

        session.train(callbacks=mark)
    # marks[0]: the start report; marks[k]: the end of step k (1-based), so step s (0-based) took marks[s+1]-marks[s].
    times = [b - a for a, b in zip(marks, marks[1:])][:total]
    result = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "built_rss": built_rss,
              "peak_device": torch.cuda.max_memory_allocated() if cuda else None}
    if side != "paired":
        return {**result, "step_times": times[args.warmup:]}
    pairs = [(times[s], times[s + 1]) for s in range(0, len(times) - 1, 2)][args.warmup:]
    return {**result, "fused": [f for f, _ in pairs], "naive": [n for _, n in pairs],
            "ratios": [f / n for f, n in pairs]}


def spawn(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--size", str(args.size),
           "--batch", str(args.batch), "--images", str(args.images), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--cache", args.cache, "--threads", str(args.threads), "--device", args.device]
    from bench_load import run_json

    return run_json(cmd, f"{side} run", cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=256, help="training images are SIZE x SIZE")
    parser.add_argument("--batch", type=int, default=1, help="images per step (the UNet sees twice as many)")
    parser.add_argument("--images", type=int, default=2, help="dataset images")
    parser.add_argument("--warmup", type=int, default=1, help="pairs (reconstruction runs: steps) not timed")
    parser.add_argument("--steps", type=int, default=5, help="timed pairs (reconstruction runs: steps)")
    parser.add_argument("--rounds", type=int, default=1, help="paired runs, each in its own subprocess")
    parser.add_argument("--no-reconstruction", action="store_true", help="skip the reconstruction-loss runs")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "alchemy-bench-apt"),
                        help="folder for the random-weight checkpoint (written once)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (the model in the file's half precision, "
                        "autocast as training uses it there; device peak memory reported too)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory(prefix=f"alchemy-bench-apt-{args.side}-") as tmp:
            print(json.dumps(run_side(args.side, args, Path(tmp))))
        return

    checkpoint(args.model, Path(args.cache))
    runs = [spawn("paired", args) for _ in range(args.rounds)]
    fused, naive, ratios = ([x for r in runs for x in r[key]] for key in ("fused", "naive", "ratios"))
    for i, (f, n, r) in enumerate(zip(fused, naive, ratios)):
        print(f"pair {i + 1}: fused {f:.3f}s, naive {n:.3f}s, ratio {r:.3f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"\n{args.model} SD1.5 architecture, {args.size}x{args.size}, batch {args.batch}, "
          f"{'CPU float32' if args.device == 'cpu' else args.device + ' half precision'}, "
          f"{len(ratios)} pairs of adjacent steps")
    print(f"step time: naive median {statistics.median(naive):.3f}s, fused median {statistics.median(fused):.3f}s; "
          f"fused/naive median of pair ratios {ratio:.3f} (target <= {TIME_TARGET}: "
          f"{'ok' if ratio <= TIME_TARGET else 'MISSED'})")
    if not args.no_reconstruction:
        for side, label in (("rec", "with decoder checkpointing"), ("rec-plain", "without")):
            res = spawn(side, args)
            print(f"reconstruction-loss step {label}: median {statistics.median(res['step_times']):.3f}s, peak RSS "
                  f"{res['peak_rss'] / 2**30:.2f} GiB ({(res['peak_rss'] - res['built_rss']) / 2**30:.2f} GiB above "
                  "the loaded model)" + (f", device peak {res['peak_device'] / 2**30:.2f} GiB" if res["peak_device"]
                                         else ""), flush=True)
    print("\nrerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_apt.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
