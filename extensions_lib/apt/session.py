"""The entry point of APT training: textual inversion's :class:`~extensions_lib.embeddings.session.
TrainingSession` (embedding patch, parts out of memory, restored exactly afterwards) building an
:class:`~.method.Apt`; with the reconstruction loss the VAE stays put and its decoder is set up for
backpropagation (:mod:`.decoder_checkpoint`) for the run. The model's parameters are frozen meanwhile (the
WebUI leaves its UNet's trainable): only the two embeddings collect gradients."""
from __future__ import annotations

import contextlib
from typing import Callable

from ..embeddings.session import TrainingSession
from ..train.loop import TrainResult
from .decoder_checkpoint import decoder_for_backward, frozen
from .method import Apt, prepare
from .options import AptTrainOptions


class AptSession(TrainingSession):
    def __init__(self, adapter, options: AptTrainOptions):
        super().__init__(adapter, options)
        if options.reconstruction:
            self.moves_parts = False  # the VAE decodes at every step

    def prepare(self, on_progress: Callable[[int, int], None] | None = None) -> Apt:
        self.method = prepare(self.adapter, self.options, on_progress, devices=self.devices)
        return self.method

    def train(self, callbacks=(), cancel=None) -> TrainResult:
        modules = self.adapter.modules()
        vae = modules.get("vae") if self.options.reconstruction else None
        ready = decoder_for_backward(vae, self.options.decoder_checkpointing) if vae is not None else \
            contextlib.nullcontext()
        with frozen([m for m in modules.values() if m is not None]), ready:
            return super().train(callbacks, cancel)


def train_apt(adapter, options: AptTrainOptions, callbacks=(), cancel=None,
              on_progress: Callable[[int, int], None] | None = None, method: Apt | None = None) -> TrainResult:
    """Train the pair ``options.embedding_name`` / ``<name>-neg`` on `adapter` (restored exactly afterwards).
    `method`: one made earlier with :func:`~.method.prepare` for this adapter and options."""
    with AptSession(adapter, options) as session:
        session.method = method
        if method is None:
            session.prepare(on_progress)
        return session.train(callbacks, cancel)
