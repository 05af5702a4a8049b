"""The pieces that keep data-parallel ranks together, each with 2 gloo processes on the CPU: one rank's stop
request stops both; the others wait out rank 0's long solo work (class images) in short heartbeats, longer
than the collective timeout, and fail when it fails; every rank gets rank 0's resume state, linked or sent."""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extensions_lib.dreambooth.distributed import Shard, StopTogether, on_rank0, resume_state_for
from extensions_lib.errors import AlchemyError
from extensions_lib.train.resume import STATE_FILE

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class _Flag:
    def __init__(self, value):
        self.value = value

    def is_set(self):
        return self.value


def _worker(rank: int, folder: str, check: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store-{check}", rank=rank, world_size=2,
                           timeout=timedelta(seconds=2))
    shard, out = Shard(rank, 2), {}
    if check == "stop":
        out["agreed"] = [StopTogether(_Flag(rank == 1 and step >= 2)).agree(False) for step in range(4)]
        out["local"] = StopTogether(_Flag(False)).agree(rank == 0)
    elif check == "wait":
        def slow(beat):
            for _ in range(4):  # 4 s alone: twice the collectives' timeout
                time.sleep(1.0)
                beat()
            return "made"
        out["result"] = on_rank0(shard, slow)
    elif check == "fail":
        def failing(beat):
            beat()
            raise ValueError("no disk space")
        try:
            on_rank0(shard, failing)
        except (ValueError, AlchemyError) as exc:
            out["error"] = type(exc).__name__
    elif check in ("link", "send"):
        run = Path(folder) / "run"
        scratch = Path(folder) / f"scratch{rank}"
        scratch.mkdir()
        if check == "send" and rank == 1:  # as on another machine: rank 0's file is not there
            real = Path.is_file
            Path.is_file = lambda self: False if self.parent == run else real(self)
        path = Path(resume_state_for(str(run), shard, scratch))
        out["path"], out["bytes"] = str(path), path.read_bytes().hex()
        out["link"] = path.is_symlink()
    dist.barrier()
    Path(folder, f"out{rank}.json").write_text(json.dumps(out))
    # Ended here, without tearing the group down: torch 2.1's gloo can hang in destroy_process_group,
    # and newer torch aborts at exit over a group left standing.
    os._exit(0)


def _run(tmp_path, check):
    mp.spawn(_worker, args=(str(tmp_path), check), nprocs=2, join=True)
    return [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]


def test_one_ranks_stop_request_stops_every_rank(tmp_path):
    out = _run(tmp_path, "stop")
    assert out[0]["agreed"] == out[1]["agreed"] == [False, False, True, True]
    assert out[0]["local"] is out[1]["local"] is True


def test_other_ranks_wait_out_long_solo_work_and_fail_with_it(tmp_path):
    out = _run(tmp_path, "wait")
    assert out[0]["result"] == "made" and out[1]["result"] is None
    out = _run(tmp_path, "fail")
    assert out[0]["error"] == "ValueError" and out[1]["error"] == "AlchemyError"


@pytest.mark.parametrize("check", ["link", "send"])
def test_every_rank_resumes_from_rank_0s_state(tmp_path, check):
    (tmp_path / "run").mkdir()
    state = tmp_path / "run" / STATE_FILE
    state.write_bytes(b"rank 0 state \x00\x01")
    out = _run(tmp_path, check)
    assert out[0]["path"] == str(state) and not out[0]["link"]
    assert out[1]["path"] == str(tmp_path / "scratch1" / STATE_FILE)  # rank 1 logs into its own folder
    assert out[0]["bytes"] == out[1]["bytes"] == state.read_bytes().hex()
    assert out[1]["link"] == (check == "link")
