"""Two glibc allocator settings that matter for training on the CPU (no-ops on other C libraries).

A training step allocates and frees the same large buffers every time. glibc hands a worker thread's
freed heaps back to the system as soon as they empty, so the next step takes page faults to get them
again: about 600,000 per step for SD1 at 256x256, a fifth of the step time. :func:`keeping_freed_memory`
raises ``M_TOP_PAD`` for the duration of a run so each heap keeps that much freed memory for the next
step, and sets the default back afterwards. The pad is sized to what a step frees at once (a larger one
keeps memory the peak does not need; 192 MB measured best for SD1). :func:`release_free_memory`
(``malloc_trim``) hands freed memory back between the phases of a run.

One lasting effect of calling ``mallopt`` at all: glibc stops adapting its mmap threshold, which stays
at the value it had reached.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from typing import Iterator

M_TOP_PAD = -2
DEFAULT_TOP_PAD = 128 * 1024
"""glibc's default (mallopt(3)), unless MALLOC_TOP_PAD_ set another."""
TRAINING_TOP_PAD = 192 * 1024 * 1024


def _glibc():
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Collect Python's garbage and hand memory the process has freed back to the system (glibc's
    ``malloc_trim``)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def keeping_freed_memory(pad: int = TRAINING_TOP_PAD) -> Iterator[bool]:
    """For the block, let each glibc heap keep up to `pad` bytes of freed memory instead of returning
    it; yields whether the setting took effect."""
    libc = _glibc()
    if libc is None or not libc.mallopt(M_TOP_PAD, int(pad)):
        yield False
        return
    try:
        yield True
    finally:
        default = os.environ.get("MALLOC_TOP_PAD_", "")
        libc.mallopt(M_TOP_PAD, int(default) if default.isdigit() else DEFAULT_TOP_PAD)
        libc.malloc_trim(0)
