"""``torchrun --nproc-per-node 2 -m extensions_lib dreambooth train`` (gloo on the CPU) trains what one process
with the doubled batch trains, and only rank 0 writes files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from extensions_lib.cli import main
from train_fakes import make_folder

ROOT = Path(__file__).resolve().parents[1]


def _args(ckpt, tmp_path, out: str, batch: int) -> list[str]:
    return ["dreambooth", "train", "--ckpt", str(ckpt), "--model-name", "subj", "--data-root", str(tmp_path / "inst"),
            "--instance-prompt", "a photo of sks thing, [filewords]", "--class-prompt", "a photo of thing",
            "--class-dir", str(tmp_path / "cls"), "--num-class-images", "3", "--prior-loss-weight", "0.5",
            "--training-width", "64", "--training-height", "64", "--steps", "3", "--seed", "5",
            "--batch-size", str(batch), "--learn-rate", "1e-2", "--lora-dir", str(tmp_path / out),
            "--log-directory", str(tmp_path / f"logs-{out}"), "--device", "cpu", "--write-csv-every", "1"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process_with_the_doubled_batch(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("sd1")
    make_folder(tmp_path / "inst", 4)
    make_folder(tmp_path / "cls", 3, captions=False)
    assert main(_args(ckpt, tmp_path, "single", 2)) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ALCHEMY_TEST_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "extensions_lib", *_args(ckpt, tmp_path, "ddp", 1)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = load_file(str(tmp_path / "single" / "subj.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "subj.safetensors"))
    assert set(single) == set(ddp)
    for key in single:  # equal up to float summation order (Adam at lr 1e-2 magnifies it a little)
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-3, atol=2e-5)
    assert main(_args(ckpt, tmp_path, "half", 1)) == 0  # the tolerance tells batch sizes apart
    half = load_file(str(tmp_path / "half" / "subj.safetensors"))
    assert max(float((half[k] - single[k]).abs().max()) for k in single) > 1e-3
    assert any(float(single[k].abs().max()) > 0 for k in single if k.endswith("lora_up.weight"))  # it trained
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == ["subj.safetensors"]
    (log_dir,) = (tmp_path / "logs-ddp").glob("*/subj")  # one log folder: rank 0's
    assert len((log_dir / "dreambooth_loss.csv").read_text().splitlines()) == 4  # header + 3 steps, written once
