"""Textual-inversion training as a :class:`~extensions_lib.train.loop.TrainingMethod`.

Only the embedding's vectors are trained: they are the optimizer's only parameters and the only
tensors that require grad, so nothing is allocated for the rest of the token-embedding matrix (no
gradient, no AdamW moments, no saved copy to restore rows from, unlike the diffusers example) and
nothing for the frozen models. The vectors reach the text encoder through the embedding patch
(:mod:`.patch`): prompts are encoded with :func:`extensions_lib.prompt.encode_prompts` and a matcher
that knows only the embedding being trained, exactly as the loader encodes them later. Latents come
from the trainer core's latent cache, so the VAE encodes each image once per run; after that
:class:`~.session.TrainingSession` keeps what training does not read out of memory
(``session.train_embedding`` is the entry point).

Files, as the WebUI lays them out: ``<log>/embeddings/<name>-<step>.pt`` every "save every" steps (and
when stopped), ``<log>/images/<name>-<step>.png`` previews, ``<log>/image_embeddings/<name>-<step>.png``
(the embedding inside the preview) and the final file back in the embeddings folder. With "save
optimizer state" each ``.pt`` gets its ``.pt.optim`` side file, and training an embedding whose side
file matches its vectors starts from that optimizer state, as the host does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import AlchemyError
from ..formats.embedding import Embedding, write_embedding
from ..formats.embedding_image import save_embedding_image
from ..formats.embedding_pt import load_optimizer_state, save_optimizer_state
from ..prompt import encode_prompts
from ..sampling.infotext import save_png
from ..sampling.txt2img import GenerationOptions, check_options, generate_from
from ..train.batches import Batch, build_training_data
from ..train.diffusion_loss import denoising_loss
from ..train.offload import OffloadSet
from ..train.plan import RunPlan, plan_run
from ..train.preview import preview_generation
from ..train.provenance import collect
from .library import EmbeddingLibrary
from .matcher import EmbeddingMatcher
from .options import EmbeddingTrainOptions
from .patch import unwrap

WRITABLE_SUFFIXES = (".pt", ".safetensors")


class TextualInversion:
    """Trains the vectors of one embedding (see the module docstring)."""

    loss_csv_name = "textual_inversion_loss.csv"

    def __init__(self, adapter, options: EmbeddingTrainOptions, embedding: Embedding, data, provenance, *,
                 final_path: Path, devices: dict[str, torch.device] | None = None):
        self.adapter = adapter
        self.options = options
        self.name = embedding.name
        self.data = data
        self.provenance = provenance
        self.final_path = Path(final_path)
        self.device = adapter.device
        self.source = embedding
        self.step_offset = int(embedding.step or 0)
        """Steps the embedding had before this run; saved files count on from it, as the host's do."""
        self.vectors: dict[str, torch.Tensor] = {}
        for info in adapter.text_encoders:
            start = embedding.vectors[info.key] if embedding.is_sdxl else embedding.vectors
            home = devices[info.key] if devices else unwrap(info.token_embedding).weight.device
            self.vectors[info.key] = start.detach().to(home, torch.float32).clone().requires_grad_(True)
        self.trained = dataclasses.replace(embedding, vectors=self._payload_vectors(self.vectors))
        """The embedding being trained: its ``vectors`` are the trainable tensors themselves."""
        self.matcher = EmbeddingMatcher(adapter.tokenizer, [self.trained])
        self.last_prompts: list[str] = []
        self._checked_prompts: set[str] = set()
        self.plan: RunPlan | None = None
        """The run's checked options (set by :func:`prepare`)."""
        self.away: OffloadSet | None = None
        """Set while training with unused parts out of memory (see :class:`~.session.TrainingSession`); previews
        bring them back for their duration."""

    @staticmethod
    def _payload_vectors(vectors: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        return vectors[""] if set(vectors) == {""} else dict(vectors)

    # --- TrainingMethod ------------------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        return list(self.vectors.values())

    def create_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        # weight_decay 0 as the WebUI: decay would pull the vectors towards zero, away from real tokens.
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        if self.options.save_optimizer_state and self.source.filename and not self.options.resume:
            state = load_optimizer_state(self.source, self.source.filename)
            if state is not None:
                try:
                    optimizer.load_state_dict(state)
                except (ValueError, KeyError):
                    pass  # a side file for another shape of vectors: start afresh, as the host does
        return optimizer

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77*k, C) text conditioning of `prompts` with the trained vectors spliced in (needs the
        embedding patch on the adapter, see :class:`~.session.TrainingSession`)."""
        return encode_prompts(self.adapter, list(prompts), clip_skip=self.options.clip_skip, matcher=self.matcher)

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        self.check_prompts(batch.prompts)
        self.last_prompts = list(batch.prompts)
        cond = self.conditioning(batch.prompts)
        on_device = batch.to(self.device)
        return denoising_loss(self.adapter, on_device.latents, cond, generator=batch.generator,
                              weight=on_device.weights, min_snr_gamma=self.options.min_snr_gamma,
                              noise_offset=self.options.noise_offset)

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": {k: v.detach().cpu().clone() for k, v in self.vectors.items()},
                "step_offset": self.step_offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for key, value in state["vectors"].items():
                self.vectors[key].copy_(value)
        self.step_offset = int(state.get("step_offset", self.step_offset))

    def output_path(self, log_dir: Path, step: int | None) -> Path:
        if step is None:
            return self.final_path
        return log_dir / "embeddings" / f"{self.name}-{step}.pt"

    def snapshot(self, name: str, step: int) -> Embedding:
        """The current vectors as an :class:`Embedding` on the CPU, with the checkpoint and provenance."""
        vectors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()}
        return Embedding(name=name, vectors=self._payload_vectors(vectors), step=self.step_offset + step,
                         sd_checkpoint=self.adapter.checkpoint_hash or None,
                         sd_checkpoint_name=self.adapter.checkpoint_name or None,
                         extra={"provenance": self.provenance.to_dict()})

    def save(self, path: Path, step: int, optimizer_state: dict | None = None) -> None:
        path = Path(path)
        name = self.name if path == self.final_path else path.stem
        embedding = self.snapshot(name, step)
        write_embedding(embedding, path)
        if optimizer_state is not None:
            save_optimizer_state(embedding, path, optimizer_state)

    def preview_options(self, step: int) -> GenerationOptions:
        return preview_generation(self.options, self.last_prompts[0] if self.last_prompts else self.name)

    def preview(self, step: int, directory: Path) -> Path | None:
        encode_fn = functools.partial(encode_prompts, matcher=self.matcher)
        with self.away.present_for() if self.away is not None else contextlib.nullcontext():
            image = generate_from(self.adapter, self.preview_options(step), encode_fn=encode_fn)[0]
        path = Path(directory) / f"{self.name}-{step}.png"
        save_png(image, path)
        if self.options.save_image_with_stored_embedding:
            self._save_image_embedding(image, Path(directory).parent / "image_embeddings" / path.name, step)
        return path

    def _save_image_embedding(self, image, path: Path, step: int) -> None:
        embedding = self.snapshot(f"{self.name}-{step}", step)
        if embedding.is_sdxl:
            return  # the image forms hold one tensor; SDXL pairs live in .safetensors only
        try:
            save_embedding_image(embedding, path, preview=image)
        except AlchemyError:  # the preview's edges decode as black: keep the text chunk only
            save_embedding_image(embedding, path, preview=image, pixels=False)

    # --- checks --------------------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Every training prompt must contain the name as the tokenizer splits it, else it trains nothing."""
        for prompt in prompts:
            if prompt in self._checked_prompts:
                continue
            if not self.matcher.find_all(self.adapter.tokenizer.tokenize([prompt])[0]):
                raise AlchemyError(f"training prompt {prompt!r} does not contain the embedding name {self.name!r} "
                                   "as a separate word, so it would train nothing", self.options.template_file,
                                   fix="write [name] apart from other letters in every template line, "
                                       "e.g. 'a photo of [name]'")
            if len(self._checked_prompts) < 10_000:
                self._checked_prompts.add(prompt)


def final_path_for(path: Path) -> Path:
    """Where the trained embedding goes: over its source file, or a ``.pt`` beside an image/``.bin``."""
    return path if path.suffix.lower() in WRITABLE_SUFFIXES else path.with_suffix(".pt")


def prepare(adapter, options: EmbeddingTrainOptions | RunPlan,
            on_progress: Callable[[int, int], None] | None = None, *,
            devices: dict[str, torch.device] | None = None) -> TextualInversion:
    """Check the options and inputs, encode the dataset's latents and build the method.

    Every check that can fail runs before anything is written. `options`: the run's options (a seed of -1
    is resolved here) or the :class:`~extensions_lib.train.plan.RunPlan` made of them. devices: where each
    encoder's vectors live (by default where its token embedding is; :class:`~.session.TrainingSession`
    passes them because it moves the matrices away first).
    """
    plan = plan_run(options)
    options = plan.options
    if not options.embedding_name:
        raise AlchemyError("no embedding chosen", fix="give the name of an embedding in the embeddings folder "
                                                      "(create one first with 'alchemy embedding create')")
    check_options(GenerationOptions(width=options.training_width, height=options.training_height,
                                    sampler=options.preview_sampler))
    entry = EmbeddingLibrary.for_model(options.embeddings_dir, adapter).entry(options.embedding_name)
    data = build_training_data(adapter, options, name=entry.name, require_name=True, on_progress=on_progress)
    provenance = collect(adapter, data.dataset, source_note=options.source_note, method="textual_inversion")
    method = TextualInversion(adapter, options, entry.embedding, data, provenance,
                              final_path=final_path_for(entry.path), devices=devices)
    method.plan = plan
    caption = data.dataset.entries[0].caption
    method.check_prompts([line.replace("[filewords]", caption).replace("[name]", entry.name)
                          for line in data.template.lines])
    return method
