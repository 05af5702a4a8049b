"""Data-parallel DreamBooth under ``torchrun`` (torch.distributed: NCCL on GPUs, gloo on CPU).

Every rank plans the same global batch (``batch_size`` × world size per micro-batch), draws the same
timesteps and noise for all of it, and runs the UNet on its own slice of the rows only; gradients are
averaged across ranks before each optimizer step. So N processes with batch size B train exactly what one
process with batch size N·B trains (up to float summation order), and a resume state written by rank 0 is
valid on every rank. Only rank 0 writes files.

Stopping and waiting are shared too, so no rank is left waiting in a collective the others never reach:
the stop request (Ctrl-C, the interrupt flag) is all-reduced at every step boundary (:class:`StopTogether`),
so one rank's interrupt stops all of them after the same step and rank 0 saves; while rank 0 works alone
(class images) the others wait in short heartbeat collectives (:func:`on_rank0`), never in one long one; and
every collective is bounded by the process group's timeout (``distributed_timeout``), after which a rank whose
peer died fails instead of hanging. On resume, every rank loads rank 0's resume state (:func:`resume_state_for`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..errors import AlchemyError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def rows(self, batch) -> list[int]:
        """The rows of `batch` (a :class:`~.data.PriorBatch` of the global batch) this rank computes:
        its slice of the instance rows, then the class rows drawn for them."""
        n = batch.latents.shape[0] - batch.prior
        per = n // self.world
        if per * self.world != n:
            raise ValueError(f"a global batch of {n} does not split over {self.world} processes")
        mine = range(self.rank * per, (self.rank + 1) * per)
        return list(mine) + [n + j for j, row in enumerate(batch.prior_rows) if row in mine]


def from_environment(timeout_s: float = 1800) -> Shard | None:
    """The shard of this process when started by torchrun with more than one process (the process group
    is initialised here, every collective bounded by `timeout_s`); None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # collectives of objects use it
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
    return Shard(dist.get_rank(), dist.get_world_size())


def _flag_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _max_over_ranks(value: int) -> int:
    import torch.distributed as dist

    flag = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopTogether:
    """The loop's ``cancel`` in a data-parallel run: :meth:`agree` (called by the loop once per step
    boundary on every rank) is true on every rank when any rank wants to stop."""

    def __init__(self, cancel=None):
        self.cancel = cancel

    def is_set(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def agree(self, local_stop: bool) -> bool:
        return bool(_max_over_ranks(int(local_stop or self.is_set())))


_WAITING, _WORKING, _DONE, _FAILED = 0, 1, 2, 3


def on_rank0(shard: Shard | None, work: Callable[[Callable[[], None]], T]) -> T | None:
    """Run ``work(beat)`` on rank 0 while the other ranks wait; `work` calls ``beat()`` after each piece
    (a class image), so the others wait in one short collective per piece and a long job never runs into
    the collectives' timeout. When rank 0 fails, every rank raises."""
    if shard is None:
        return work(lambda: None)
    if shard.rank == 0:
        try:
            result = work(lambda: _max_over_ranks(_WORKING))
        except BaseException:
            _max_over_ranks(_FAILED)
            raise
        _max_over_ranks(_DONE)
        return result
    while True:
        state = _max_over_ranks(_WAITING)
        if state == _DONE:
            return None
        if state == _FAILED:
            raise AlchemyError("rank 0 failed while preparing the run (see its output)")


def resume_state_for(resume: str, shard: Shard, scratch: Path) -> str:
    """The resume state this rank loads: rank 0's own file on rank 0; on the other ranks a link to it in
    their scratch folder (their log folder, so nothing of theirs lands in rank 0's), or a copy rank 0
    sends when some rank cannot read its file (no shared file system)."""
    import torch.distributed as dist
    from ..train.resume import STATE_FILE, find_resume_state

    found: list = [None, None]
    if shard.rank == 0:
        try:
            found[0] = str(find_resume_state(resume))
        except AlchemyError as exc:
            found[1] = str(exc)
    dist.broadcast_object_list(found, src=0)
    if found[1] is not None:
        raise AlchemyError(found[1] if shard.rank == 0 else f"rank 0 cannot resume: {found[1]}")
    state = Path(found[0])
    if shard.rank == 0:
        local = state
    else:
        local = Path(scratch) / STATE_FILE
    everyone_reads = _max_over_ranks(0 if state.is_file() else 1) == 0
    if everyone_reads:
        if shard.rank != 0:
            try:
                local.symlink_to(state)
            except OSError:  # no symlinks (Windows without the privilege)
                shutil.copyfile(state, local)
        return str(local)
    payload = [state.read_bytes() if shard.rank == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    if shard.rank != 0:
        local.write_bytes(payload[0])
    return str(local)


def local_device() -> str:
    """This process's device under torchrun: its own GPU, or the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def average_gradients(params, world: int) -> list:
    """Hooks that replace each parameter's gradient by its mean over the ranks; remove the returned
    handles afterwards."""
    import torch.distributed as dist

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    return [p.register_hook(hook) for p in params if p.requires_grad]


def barrier(shard: Shard | None) -> None:
    if shard is not None:
        import torch.distributed as dist

        dist.barrier()
