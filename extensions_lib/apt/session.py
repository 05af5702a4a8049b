"""The entry point of APT training: textual inversion's :class:`~extensions_lib.embeddings.session.
TrainingSession` (a run set-up: every model weight frozen, the embedding patch, parts out of memory, all
undone afterwards) building an :class:`~.method.Apt`; with the reconstruction loss the VAE stays put and its
decoder is checkpointed for the run (:mod:`.decoder_checkpoint`)."""
from __future__ import annotations

from typing import Callable

from ..embeddings.session import TrainingSession
from ..train.loop import TrainResult
from ..train.plan import RunPlan
from .decoder_checkpoint import checkpointed_decoder
from .method import Apt, prepare
from .options import AptTrainOptions


class AptSession(TrainingSession):
    def __init__(self, adapter, options: AptTrainOptions | RunPlan):
        super().__init__(adapter, options)
        self.run_options = options.options if isinstance(options, RunPlan) else options
        if self.run_options.reconstruction:
            self.moves_parts = False  # the VAE decodes at every step

    def prepare(self, on_progress: Callable[[int, int], None] | None = None) -> Apt:
        self.method = prepare(self.adapter, self.options, on_progress, devices=self.devices)
        return self.method

    def train(self, callbacks=(), cancel=None) -> TrainResult:
        vae = self.adapter.modules().get("vae")
        if self.run_options.reconstruction and self.run_options.decoder_checkpointing and vae is not None:
            self.setup.apply(checkpointed_decoder(vae))
        return super().train(callbacks, cancel)


def train_apt(adapter, options: AptTrainOptions | RunPlan, callbacks=(), cancel=None,
              on_progress: Callable[[int, int], None] | None = None, method: Apt | None = None) -> TrainResult:
    """Train the pair ``options.embedding_name`` / ``<name>-neg`` on `adapter` (restored exactly afterwards).
    `method`: one made earlier with :func:`~.method.prepare` for this adapter and options."""
    with AptSession(adapter, options) as session:
        session.method = method
        if method is None:
            session.prepare(on_progress)
        return session.train(callbacks, cancel)
