"""One rank of a DreamBooth run under torchrun, for tests: ``python -m torch.distributed.run ... ddp_dreambooth_worker.py
CKPT ROOT OUT STEPS [--stop-rank R --stop-at S] [--resume LOG_DIR] [--fused]``. The rank `R` sets its own
interrupt flag after step `S` (the other ranks are not told); each rank prints one JSON line with its result."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from extensions_lib.backend.standalone import load_model
from extensions_lib.dreambooth.distributed import from_environment, local_device
from extensions_lib.dreambooth.method import train_dreambooth
from extensions_lib.dreambooth.options import DreamBoothTrainOptions

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
for name in ("ckpt", "root", "out"):
    parser.add_argument(name)
parser.add_argument("steps", type=int)
parser.add_argument("--stop-rank", type=int, default=-1)
parser.add_argument("--stop-at", type=int, default=0)
parser.add_argument("--resume", default="")
parser.add_argument("--fused", action="store_true")
args = parser.parse_args()
root = Path(args.root)
shard = from_environment(timeout_s=120)
model = load_model(Path(args.ckpt), device=local_device())
options = DreamBoothTrainOptions(
    model_name="subj", data_root=str(root / "inst"), instance_prompt="a photo of sks thing, [filewords]",
    class_prompt="a photo of thing", class_dir=str(root / "cls"), num_class_images=3, prior_loss_weight=0.5,
    training_width=64, training_height=64, seed=5, steps=args.steps, learn_rate="1e-2", batch_size=1,
    lora_dir=str(root / args.out), log_directory=str(root / f"logs-{args.out}"), save_every=0, create_image_every=0,
    write_csv_every=1, resume=args.resume, fused_backward_step=args.fused)
cancel = threading.Event()


def interrupt(progress):
    if shard.rank == args.stop_rank and progress.step >= args.stop_at:
        cancel.set()


start = time.monotonic()
result = train_dreambooth(model, options, callbacks=interrupt, cancel=cancel, shard=shard)
line = json.dumps({"rank": shard.rank, "step": result.step, "cancelled": result.cancelled,
                   "log_dir": str(result.log_dir), "seconds": time.monotonic() - start}) + "\n"
# one write() of the whole line: the ranks share torchrun's stdout pipe, and print() under an unbuffered stdout
# (PYTHONUNBUFFERED) writes the text and its newline separately, so two ranks' lines could interleave. A pipe
# write of at most PIPE_BUF bytes is atomic.
sys.stdout.flush()
os.write(sys.stdout.fileno(), line.encode())
