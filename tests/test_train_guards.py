"""The spike guard beside the NaN guard, and the log files a resumed run keeps consistent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.train.guards import SpikeGuard, weights_rms
from extensions_lib.train.loop import train
from extensions_lib.train.resume import load_resume_state
from test_train_loop import opts
from train_fakes import LinearMethod, ToyData


def test_exploding_weights_stop_the_run_and_leave_the_last_good_files(tmp_path):
    method = LinearMethod(ToyData())
    with pytest.raises(AlchemyError, match="training stopped at step 6: the trained weights exploded") as info:
        train(method, opts(tmp_path, steps=20, save_every=2, learn_rate="0.05:5, 1e9"))
    assert "lower the learning rate" in str(info.value)
    assert [(p.name, step) for p, step, _ in method.saved] == [("linear-2.pt", 2), ("linear-4.pt", 4)]
    log_dir = method.saved[0][0].parent.parent
    assert not (log_dir / "snapshots" / "linear.pt").exists()
    assert load_resume_state(log_dir)["step"] == 4
    good = torch.load(method.saved[-1][0], weights_only=True)["w"]
    assert weights_rms([good]) < 10 < weights_rms([method.w])


def test_a_healthy_run_never_trips_the_guard(tmp_path):
    result = train(LinearMethod(ToyData(), noise=0.3), opts(tmp_path, steps=60, learn_rate="0.2"))
    assert result.step == 60 and not result.cancelled


def test_loss_spike_against_the_recent_median():
    w = torch.ones(4)
    guard = SpikeGuard([w])
    for loss in (0.5, 0.2, 0.9, 0.05, 0.3):
        assert guard.problem(loss) is None
    assert guard.problem(80.0) is None          # below the absolute floor: noisy, not exploded
    assert "the loss jumped to 1e+06" in guard.problem(1e6)
    w.mul_(2000)
    assert "exploded" in guard.problem(0.1)
    w.fill_(float("nan"))
    assert "exploded" in guard.problem(0.1)


def test_resumed_loss_csv_keeps_one_line_ending(tmp_path):
    from extensions_lib.train.run_log import append_csv, trim_csv

    path = tmp_path / "loss.csv"
    for step in (1, 2, 3):
        append_csv(path, [step, 0, step - 1, f"{step / 10:.7f}", 0.01])
    trim_csv(path, 2)
    append_csv(path, [3, 0, 2, "0.3000000", 0.01])
    data = path.read_bytes()
    assert b"\r" not in data
    assert data.decode().splitlines()[1:] == ["1,0,0,0.1000000,0.01", "2,0,1,0.2000000,0.01", "3,0,2,0.3000000,0.01"]


def test_leftover_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    import os
    import re
    import tempfile
    import time

    first = train(LinearMethod(ToyData()), opts(tmp_path, steps=2, save_every=1))
    snapshots = first.log_dir / "snapshots"
    # exactly what atomic_path's mkstemp call names a temporary file, as a killed save leaves it
    fd, name = tempfile.mkstemp(prefix=".linear-3.pt.", suffix=".tmp", dir=snapshots)
    os.close(fd)
    killed = Path(name)
    assert re.fullmatch(r"\.linear-3\.pt\.[a-z0-9_]{8}\.tmp", killed.name)
    fresh = snapshots / ".linear-6.pt.abcdefgh.tmp"   # a save still writing: recently modified, kept
    fresh.write_bytes(b"busy")
    foreign = [snapshots / "notes.tmp", snapshots / ".linear.pt.tmp", first.log_dir / ".x.pt.ABCDEFGH.tmp"]
    for path in foreign:
        path.write_bytes(b"theirs")
    old = time.time() - 3600
    for path in [killed, *foreign]:
        os.utime(path, (old, old))
    train(LinearMethod(ToyData()), opts(tmp_path, steps=3, resume=str(first.resume_path)))
    assert not killed.exists()
    assert fresh.exists() and all(p.exists() for p in foreign)
