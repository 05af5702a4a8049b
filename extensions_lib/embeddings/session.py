"""Setting the model up for training an embedding, and undoing it: :class:`TrainingSession`.

Beyond the embedding patch the method needs, a session keeps what training does not read out of memory
(the VAE once the latents are cached, and every row of the token-embedding matrices no prompt uses:
:mod:`.offload`, :mod:`.token_rows`) and, on the CPU, has the UNet's frozen layers save less for
backward (:mod:`.lean_backward`) and glibc keep freed memory for the next step (:mod:`.cpu_memory`).
Previews bring everything back for their duration; leaving the session restores the model exactly.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

from torch import nn

from ..train.loop import TrainResult, train
from ..train.low_memory import low_memory_layers
from .cpu_memory import keeping_freed_memory, release_free_memory
from .lean_backward import lean_backward
from .method import TextualInversion, prepare
from .offload import Offload, OffloadSet
from .options import EmbeddingTrainOptions
from .patch import EmbeddingPatch, patch_text_encoders, unwrap
from .token_rows import TokenRows, can_stand_in_for


def may_move_parts(adapter) -> bool:
    """False when the adapter (or its host: WebUI ``--medvram``/``--lowvram``, a standalone model loaded with
    ``offload``) moves parts between devices itself: moving them as well would fight it."""
    return not (getattr(adapter, "offloaded", False) or getattr(adapter, "offload", False))


def _all_real(module: nn.Module) -> bool:
    """No meta tensor in `module` (a host may park parts as meta tensors; those are not ours to move)."""
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def token_tables(patch: EmbeddingPatch) -> OffloadSet:
    """The patched token-embedding matrices as an :class:`OffloadSet` whose stand-ins
    (:class:`TokenRows`, the rows prompts use) serve lookups while the matrices are away."""
    offloads, stand_ins = [], []
    for wrapper in patch.wrappers:
        table = wrapper.wrapped
        if can_stand_in_for(table) and _all_real(table):
            offload = Offload(table)
            offloads.append(offload)
            stand_ins.append((wrapper, TokenRows(functools.partial(offload.read_rows, "weight"), *table.weight.shape,
                                                 table.weight.dtype, table.weight.device)))

    def use_rows(on: bool) -> None:
        for wrapper, rows in stand_ins:
            wrapper.rows = rows if on else None

    return OffloadSet(offloads, on_away=lambda: use_rows(True), on_back=lambda: use_rows(False))


def unused_parts(adapter, patch: EmbeddingPatch) -> OffloadSet:
    """Everything training never reads once the latents are cached: the VAE and the token-embedding rows
    no prompt uses."""
    vae = adapter.modules().get("vae")
    return OffloadSet([token_tables(patch), *([Offload(vae)] if vae is not None and _all_real(vae) else [])])


class TrainingSession:
    """The model set up for training an embedding, undone on exit::

        with TrainingSession(adapter, options) as session:
            method = session.prepare()        # checks, latents (VAE), the method
            result = session.train(callbacks)

    Entering patches the text encoder and (``options.offload_unused``, unless the adapter or its host
    places parts itself: :func:`may_move_parts`) moves the token-embedding matrices out of memory (:func:`token_tables`); :meth:`train` also moves the VAE away once the latents are
    cached, then runs the trainer core's loop (see the module docstring for the rest).
    """

    def __init__(self, adapter, options: EmbeddingTrainOptions):
        self.adapter = adapter
        self.options = options
        self.moves_parts = options.offload_unused and may_move_parts(adapter)
        self.method: TextualInversion | None = None
        self._patch: EmbeddingPatch | None = None
        self._tables: OffloadSet | None = None

    def __enter__(self) -> "TrainingSession":
        self.devices = {info.key: unwrap(info.token_embedding).weight.device for info in self.adapter.text_encoders}
        self._patch = patch_text_encoders(self.adapter)
        try:
            if self.moves_parts:
                self._tables = token_tables(self._patch)
                self._tables.move_away()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._tables is not None:
                self._tables.put_back()
        finally:
            self._tables = None
            self._patch.unpatch()

    def prepare(self, on_progress: Callable[[int, int], None] | None = None) -> TextualInversion:
        self.method = prepare(self.adapter, self.options, on_progress, devices=self.devices)
        return self.method

    def train(self, callbacks=(), cancel=None) -> TrainResult:
        method = self.method if self.method is not None else self.prepare()
        vae = self.adapter.modules().get("vae") if self.moves_parts else None
        vae_away = Offload(vae) if vae is not None and _all_real(vae) else None
        parts = [part for part in (self._tables, vae_away) if part is not None]
        method.away = OffloadSet(parts) if parts else None
        if vae_away is not None:
            vae_away.move_away()
        release_free_memory()
        on_cpu = self.adapter.device.type == "cpu"
        unet = self.adapter.modules().get("unet")
        # CPU only for now: the lean layers' backward under CUDA autocast has not been run on a GPU yet.
        lean = lean_backward(unet) if unet is not None and on_cpu else contextlib.nullcontext()
        try:
            with low_memory_layers(self.adapter, self.options.low_memory), lean, \
                    keeping_freed_memory() if on_cpu else contextlib.nullcontext():
                return train(method, self.options, callbacks, cancel)
        finally:
            method.away = None
            release_free_memory()
            if vae_away is not None:
                vae_away.put_back()


def train_embedding(adapter, options: EmbeddingTrainOptions, callbacks=(), cancel=None,
                    on_progress: Callable[[int, int], None] | None = None,
                    method: TextualInversion | None = None) -> TrainResult:
    """Train ``options.embedding_name`` on `adapter` in a :class:`TrainingSession` (the model is restored
    exactly afterwards). `method`: one made earlier with :func:`prepare` for this adapter and options."""
    with TrainingSession(adapter, options) as session:
        session.method = method
        if method is None:
            session.prepare(on_progress)
        return session.train(callbacks, cancel)
