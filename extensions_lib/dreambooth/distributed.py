"""Data-parallel DreamBooth under ``torchrun`` (torch.distributed: NCCL on GPUs, gloo on CPU).

Every rank plans the same global batch (``batch_size`` × world size per micro-batch), draws the same
timesteps and noise for all of it, and runs the UNet on its own slice of the rows only; gradients are
averaged across ranks before each optimizer step. So N processes with batch size B train exactly what one
process with batch size N·B trains (up to float summation order), and a resume state written by rank 0 is
valid on every rank. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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


def from_environment() -> Shard | None:
    """The shard of this process when started by torchrun with more than one process (the process group
    is initialised here); None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


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
