"""Under torchrun (2 gloo processes on the CPU): when one rank is interrupted every rank stops after the
same step and rank 0 keeps the files; every rank resumes from rank 0's state, and the interrupted and resumed
run ends where an uninterrupted one does. The fused backward+step trains data-parallel what the plain step does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from extensions_lib.train.resume import load_resume_state

from train_fakes import make_folder

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ddp_dreambooth_worker.py"


def _launch(tmp_path, ckpt, out, steps, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    # its own session, so a hung run's workers go with it (torchrun killed alone would leave them behind)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(WORKER), str(ckpt), str(tmp_path), out, str(steps), *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _results(proc: subprocess.Popen, timeout: float, expect_rc: int | None = 0) -> list[dict]:
    """Each rank's JSON line, rank 0 first."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s")
    if expect_rc is not None:
        assert proc.returncode == expect_rc, stderr[-3000:]
    results = sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], stderr[-3000:]
    return results


def _torchrun(tmp_path, ckpt, out, steps, *extra, timeout=240):
    return _results(_launch(tmp_path, ckpt, out, steps, *extra), timeout)


def _lora(tmp_path, out):
    return load_file(str(tmp_path / out / "subj.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_one_rank_interrupted_stops_all_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("sd1")
    make_folder(tmp_path / "inst", 4)
    make_folder(tmp_path / "cls", 3, captions=False)
    whole = _torchrun(tmp_path, ckpt, "whole", 4, "--fused")
    assert [r["step"] for r in whole] == [4, 4]

    # rank 1 alone is interrupted after step 2: both stop there, at once, and rank 0 writes the files
    stopped = _torchrun(tmp_path, ckpt, "part", 4, "--fused", "--stop-rank", "1", "--stop-at", "2", timeout=120)
    assert [(r["step"], r["cancelled"]) for r in stopped] == [(2, True), (2, True)]
    assert abs(stopped[0]["seconds"] - stopped[1]["seconds"]) < 30
    log_dir = Path(stopped[0]["log_dir"])
    assert (log_dir / "resume-state.pt").is_file()
    assert set(_lora(tmp_path, "part")) == set(_lora(tmp_path, "whole"))  # the file at step 2, complete
    assert [p.name for p in (tmp_path / "part").iterdir()] == ["subj.safetensors"]

    resumed = _torchrun(tmp_path, ckpt, "part", 4, "--fused", "--resume", str(log_dir))
    assert [r["step"] for r in resumed] == [4, 4]
    assert resumed[0]["log_dir"] == str(log_dir) and resumed[1]["log_dir"] != str(log_dir)
    a, b = _lora(tmp_path, "whole"), _lora(tmp_path, "part")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (log_dir / "dreambooth_loss.csv").read_text().splitlines()
    assert len(rows) == 5 and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # rank 0's, once

    plain = _torchrun(tmp_path, ckpt, "plain", 4)  # the fused step trains what the plain one does
    p = _lora(tmp_path, "plain")
    for key in p:
        torch.testing.assert_close(a[key], p[key], rtol=1e-4, atol=1e-6)
    assert any(float(p[k].abs().max()) > 0 for k in p if k.endswith("lora_up.weight"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ctrl_c_in_the_terminal_stops_every_rank_and_keeps_the_files(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("sd1")
    make_folder(tmp_path / "inst", 4)
    make_folder(tmp_path / "cls", 3, captions=False)
    proc = _launch(tmp_path, ckpt, "out", 500)
    deadline = time.monotonic() + 180
    csv = None
    while time.monotonic() < deadline and proc.poll() is None:  # until 2 steps are done
        found = list(tmp_path.glob("logs-out/*/subj/dreambooth_loss.csv"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            csv = found[0]
            break
        time.sleep(0.2)
    assert csv is not None, "the run did not start"
    # a terminal's Ctrl-C goes to every process of the foreground group: torchrun and its workers (and
    # torchrun passes it on to the workers once more)
    os.killpg(proc.pid, signal.SIGINT)
    results = _results(proc, timeout=60, expect_rc=None)
    steps = {r["step"] for r in results}
    assert len(steps) == 1 and all(r["cancelled"] for r in results)
    (step,) = steps
    assert 2 <= step < 500
    assert load_resume_state(csv.parent)["step"] == step
    lora = _lora(tmp_path, "out")
    assert any(k.endswith("lora_up.weight") for k in lora)
