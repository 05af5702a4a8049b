"""Setting the model up for training an embedding, and undoing it: :class:`TrainingSession`.

The session is a :class:`~extensions_lib.train.setup.RunSetup` (every model weight frozen) with the
embedding patch the method needs; beyond that it keeps what training does not read out of memory (the VAE
once the latents are cached, and every row of the token-embedding matrices no prompt uses:
:mod:`extensions_lib.train.offload`, :mod:`.token_rows`) and, on the CPU, has the UNet's frozen layers save
less for backward (:mod:`extensions_lib.train.lean_backward`) and those at its lowest resolutions hold
float16 weights and compute from row chunks (:mod:`extensions_lib.train.low_res_layers`). Previews bring
everything back for their duration; leaving the session restores the model exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable

import torch

from ..train.loop import TrainResult, train
from ..train.offload import Offload, OffloadSet
from ..train.plan import RunPlan
from ..train.setup import RunSetup, all_real
from ..train.low_memory import low_memory_layers, precision_in_effect
from .method import TextualInversion, prepare
from .options import EmbeddingTrainOptions
from .patch import EmbeddingPatch, patch_text_encoders, unwrap
from .token_rows import TokenRows, can_stand_in_for


def token_tables(patch: EmbeddingPatch) -> OffloadSet:
    """The patched token-embedding matrices as an :class:`OffloadSet` whose stand-ins
    (:class:`TokenRows`, the rows prompts use) serve lookups while the matrices are away."""
    offloads, stand_ins = [], []
    for wrapper in patch.wrappers:
        table = wrapper.wrapped
        if can_stand_in_for(table) and all_real(table):
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
    return OffloadSet([token_tables(patch), *([Offload(vae)] if vae is not None and all_real(vae) else [])])


class TrainingSession:
    """The model set up for training an embedding, undone on exit::

        with TrainingSession(adapter, options) as session:
            method = session.prepare()        # checks, latents (VAE), the method
            result = session.train(callbacks)

    Entering freezes the model and patches the text encoder, and (``options.offload_unused``, unless the
    adapter or its host places parts itself: ``adapter.moves_parts``) moves the token-embedding matrices out
    of memory (:func:`token_tables`); :meth:`train` also moves the VAE away once the latents are cached, then
    runs the trainer core's loop (see the module docstring for the rest). `options` may be the
    :class:`~extensions_lib.train.plan.RunPlan` made of them.
    """

    def __init__(self, adapter, options: EmbeddingTrainOptions | RunPlan):
        self.adapter = adapter
        self.options = options
        self.setup = RunSetup(adapter)
        run_options = options.options if isinstance(options, RunPlan) else options
        self.run_options = run_options
        self.moves_parts = run_options.offload_unused and self.setup.may_move_parts
        self.method: TextualInversion | None = None
        self._tables: OffloadSet | None = None

    def __enter__(self) -> "TrainingSession":
        setup = self.setup.__enter__()
        try:
            self.devices = {info.key: unwrap(info.token_embedding).weight.device
                            for info in self.adapter.text_encoders}
            self._patch = patch_text_encoders(self.adapter)
            setup.undo_with(self._patch.unpatch)
            # before the latents, so the VAE encodes beside the smaller UNet; not under bfloat16 low memory,
            # whose layers hand bfloat16 activations on (these compute in float32)
            opts = self.run_options
            if not (getattr(opts, "low_memory", False) and precision_in_effect(self.adapter).compute == torch.bfloat16):
                setup.low_res_layers(opts.training_width, opts.training_height, opts.batch_size)
            if self.moves_parts:
                self._tables = token_tables(self._patch)
                setup.move_away(self._tables)
        except BaseException:
            self.setup.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> bool:
        return self.setup.__exit__(*exc)

    def prepare(self, on_progress: Callable[[int, int], None] | None = None) -> TextualInversion:
        self.method = prepare(self.adapter, self.options, on_progress, devices=self.devices)
        return self.method

    def train(self, callbacks=(), cancel=None) -> TrainResult:
        method = self.method if self.method is not None else self.prepare()
        setup = self.setup
        vae = self.adapter.modules().get("vae") if self.moves_parts else None
        vae_away = Offload(vae) if vae is not None and all_real(vae) else None
        if vae_away is not None:
            setup.move_away(vae_away)
        parts = [part for part in (self._tables, vae_away) if part is not None]
        method.away = OffloadSet(parts) if parts else None
        setup.undo_with(lambda: setattr(method, "away", None))
        setup.release_memory()
        precision = setup.apply(low_memory_layers(self.adapter, method.plan.options.low_memory))  # before lean_backward
        if precision is not None:
            method.provenance = dataclasses.replace(method.provenance, precision=precision.describe())
        setup.lean_backward()
        return train(method, method.plan, callbacks, cancel)


def train_embedding(adapter, options: EmbeddingTrainOptions | RunPlan, callbacks=(), cancel=None,
                    on_progress: Callable[[int, int], None] | None = None,
                    method: TextualInversion | None = None) -> TrainResult:
    """Train ``options.embedding_name`` on `adapter` in a :class:`TrainingSession` (the model is restored
    exactly afterwards). `method`: one made earlier with :func:`~.method.prepare` for this adapter and options."""
    with TrainingSession(adapter, options) as session:
        session.method = method
        if method is None:
            session.prepare(on_progress)
        return session.train(callbacks, cancel)
