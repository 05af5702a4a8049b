"""APT training as a :class:`~extensions_lib.train.loop.TrainingMethod`.

:class:`Apt` is textual inversion of the positive (:class:`~extensions_lib.embeddings.method.TextualInversion`:
vectors, snapshots, host-format saving, previews) with the negative's ``TextualInversion`` beside it; it adds what
APT changes: one text-encoder call with a matcher that knows both names, the guided loss (:mod:`.guided`), the negative's
learning-rate multiplier as a parameter group's ``lr_scale`` (the loop applies it at every update,
through every schedule stage), each embedding's gradient clipped on its own before every update, the
optional EMA, previews with ``{name}-neg`` as the negative prompt, and both files saved together.

Files: ``<log>/embeddings/<name>-<step>.pt`` with ``<name>-<step>-neg.pt`` (usable as a pair under
those names), ``<log>/images/<name>-<step>.png``, optionally ``<log>/image_embeddings/`` (both
embeddings inside the preview), and the final pair back in the embeddings folder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from ..embeddings.library import EmbeddingLibrary
from ..embeddings.matcher import EmbeddingMatcher
from ..embeddings.method import TextualInversion, final_path_for
from ..errors import AlchemyError
from ..formats.embedding import Embedding
from ..sampling.txt2img import GenerationOptions, check_options
from ..train.batches import build_training_data
from ..train.plan import RunPlan, plan_run
from ..train.provenance import collect
from .att_mask import is_mask_file
from .cfg_scale import parse_cfg_scale
from .data import AptBatch, AptData
from .guided import apt_loss
from .options import NEG_SUFFIX, AptTrainOptions


class Ema:
    """Exponential moving average of some vectors that replaces them every `replace_every` steps."""

    def __init__(self, vectors: dict[str, torch.Tensor], decay: float, replace_every: int):
        self.vectors, self.decay, self.replace_every = vectors, decay, max(1, replace_every)
        self.average = {k: v.detach().clone() for k, v in vectors.items()}

    def update(self, step: int) -> None:
        with torch.no_grad():
            for key, live in self.vectors.items():
                self.average[key].mul_(self.decay).add_(live.detach(), alpha=1 - self.decay)
                if step % self.replace_every == 0:
                    live.copy_(self.average[key])


class Apt(TextualInversion):
    """Trains ``{name}`` and ``{name}-neg`` together (see the module docstring): textual inversion of the
    positive (``self``, also ``self.pos``) with the negative's :class:`TextualInversion` (``self.neg``) beside it."""

    loss_csv_name = "prompt_tuning_loss.csv"

    def __init__(self, adapter, options: AptTrainOptions, pos: Embedding, neg: TextualInversion, data: AptData,
                 provenance, *, final_path: Path, devices: dict[str, torch.device] | None = None):
        super().__init__(adapter, options, pos, data, provenance, final_path=final_path, devices=devices)
        self.pos, self.neg = self, neg
        self.cfg = parse_cfg_scale(options.cfg_scale)
        self.matcher = EmbeddingMatcher(adapter.tokenizer, [self.trained, neg.trained])
        self.emas = [Ema(half.vectors, decay, every) for half, decay, every in
                     ((self, options.ema_decay, options.ema_replace_every),
                      (neg, options.ema_decay_neg, options.ema_replace_every_neg)) if decay < 1]
        self.optimizer: torch.optim.Optimizer | None = None

    # --- TrainingMethod ------------------------------------------------------------------------------
    def parameters(self) -> list[dict]:
        # weight_decay 0 as for textual inversion: decay would pull the vectors away from real tokens.
        return [{"params": super().parameters(), "lr_scale": 1.0, "weight_decay": 0.0},
                {"params": self.neg.parameters(), "lr_scale": self.options.neg_lr_scale, "weight_decay": 0.0}]

    def create_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        if self.options.embedding_clip_norm > 0:
            # Runs inside optimizer.step(): after the loop's unscaling and skip checks, just before the update.
            self.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.clip_gradients())
        return self.optimizer

    def clip_gradients(self) -> None:
        for vectors in (super().parameters(), self.neg.parameters()):
            torch.nn.utils.clip_grad_norm_(vectors, self.options.embedding_clip_norm)

    def conditioning_pair(self, negative_prompts: list[str], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) conditioning from one text-encoder call on ``[negatives, positives]``."""
        cond = self.conditioning([*negative_prompts, *prompts])
        return cond[:len(negative_prompts)], cond[len(negative_prompts):]

    def loss(self, batch: AptBatch, step: int) -> torch.Tensor:
        self.check_prompts(batch.prompts)
        self.last_prompts = list(batch.prompts)
        cond_neg, cond_pos = self.conditioning_pair(batch.negative_prompts, batch.prompts)
        on_device = batch.to(self.device)
        o = self.options
        return apt_loss(self.adapter, on_device.latents, cond_neg, cond_pos, self.cfg, generator=batch.generator,
                        weight=on_device.weights, pixels=batch.pixels,
                        reconstruction_weight=o.reconstruction_weight if o.reconstruction else 0.0,
                        min_snr_gamma=o.min_snr_gamma, noise_offset=o.noise_offset)

    def after_step(self, step: int) -> None:
        for ema in self.emas:
            ema.update(step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "neg": self.neg.state_dict(),
                "ema": [{k: v.clone() for k, v in ema.average.items()} for ema in self.emas]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.neg.load_state_dict(state["neg"])
        for ema, average in zip(self.emas, state.get("ema", [])):
            for key, value in average.items():
                ema.average[key].copy_(value)

    def negative_path(self, path: Path) -> Path:
        """The negative's file beside the positive's `path` (``x-500.pt`` → ``x-500-neg.pt``)."""
        path = Path(path)
        return self.neg.final_path if path == self.final_path else path.with_name(
            f"{path.stem}{NEG_SUFFIX}{path.suffix}")

    def save(self, path: Path, step: int, optimizer_state: dict | None = None) -> None:
        self.neg.save(self.negative_path(path), step)
        super().save(path, step)

    def preview_options(self, step: int) -> GenerationOptions:
        opts = super().preview_options(step)
        if self.options.preview_from_txt2img:
            return opts
        return dataclasses.replace(opts, negative=self.data.negative_prompt(opts.prompt), cfg_scale=self.cfg.mean())

    def _save_image_embedding(self, image, path: Path, step: int) -> None:
        super()._save_image_embedding(image, path, step)
        self.neg.save_image_embedding_as(f"{self.name}-{step}{NEG_SUFFIX}", image, self.negative_path(path), step)


def prepare(adapter, options: AptTrainOptions | RunPlan, on_progress: Callable[[int, int], None] | None = None, *,
            devices: dict[str, torch.device] | None = None) -> Apt:
    """Check the options and inputs, encode the dataset's latents and build the method; every check that
    can fail runs before anything is written. `options`: the run's options (a seed of -1 is resolved here) or
    the :class:`~extensions_lib.train.plan.RunPlan` made of them."""
    plan = plan_run(options)
    options = plan.options
    if not options.embedding_name:
        raise AlchemyError("no embedding chosen", fix="give the name of the positive embedding (create the pair "
                                                      "first with 'alchemy apt create')")
    if options.save_optimizer_state:
        raise AlchemyError("APT does not write .optim side files (one optimizer spans both embeddings)",
                           fix="turn off save_optimizer_state; the resume state keeps the optimizer (--resume)")
    parse_cfg_scale(options.cfg_scale)
    if options.reconstruction and getattr(adapter, "moves_parts", False):
        # The host parks the UNet while the VAE decodes; the backward pass then meets parked weights.
        raise AlchemyError("the reconstruction loss needs the UNet and the VAE in memory together, but this model's "
                           "parts are moved in and out by the host (--medvram / --lowvram) or loaded with offload",
                           fix="turn off reconstruction, or run without --medvram/--lowvram (offload)")
    check_options(GenerationOptions(width=options.training_width, height=options.training_height,
                                    sampler=options.preview_sampler))
    library = EmbeddingLibrary.for_model(options.embeddings_dir, adapter)
    pos_entry = library.entry(options.embedding_name)
    neg_name = pos_entry.name + NEG_SUFFIX
    if not any(e.name == neg_name for e in library.entries()):  # (an unusable one: entry() says why)
        raise AlchemyError(f"the negative embedding {neg_name!r} of {pos_entry.name!r} is missing", library.directory,
                           fix="create the pair with 'alchemy apt create' (or copy the -neg file beside it)")
    neg_entry = library.entry(neg_name)
    base = build_training_data(adapter, options, name=pos_entry.name, require_name=True, exclude=is_mask_file,
                               on_progress=on_progress)
    data = AptData(base, neg_name, masks=options.attention_masks, pixels=options.reconstruction)
    provenance = collect(adapter, data.dataset, source_note=options.source_note, method="apt")
    neg = TextualInversion(adapter, options, neg_entry.embedding, data, provenance,
                           final_path=final_path_for(neg_entry.path), devices=devices)
    method = Apt(adapter, options, pos_entry.embedding, neg, data, provenance, final_path=final_path_for(pos_entry.path),
                 devices=devices)
    method.plan = neg.plan = plan
    caption = data.dataset.entries[0].caption
    method.check_prompts([line.replace("[filewords]", caption).replace("[name]", pos_entry.name)
                          for line in data.template.lines])
    return method
