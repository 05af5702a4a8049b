"""DreamBooth over the trainer core: :func:`train_dreambooth` and its :class:`DreamBoothMethod`.

In a :class:`~extensions_lib.train.setup.RunSetup` (every model weight frozen first), LoRA mode wraps the
UNet's transformer layers (and the text encoder's, when asked) with new LoRA layers and trains only those;
full mode unfreezes the UNet (and the text encoder) and trains its weights in place (half-precision ones as
float32), restoring the original weights afterwards unless ``keep_trained_weights`` (:class:`OriginalWeights`).
Missing class images are generated first with the model as loaded. The loss is instance + λ·prior (:mod:`.loss`), with eps or v targets as the model predicts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import AlchemyError
from ..train.loop import TrainResult, train
from ..train.plan import RunPlan, plan_run
from ..train.provenance import Provenance, collect
from ..train.diffusion_loss import sample_noise, sample_timesteps
from ..train.setup import RunSetup
from .class_images import generate_class_images
from .concepts import concepts_from_options
from .distributed import Shard, StopTogether, average_gradients, barrier, on_rank0, resume_state_for
from .data import DreamBoothData, PriorBatch, build_dreambooth_data
from .files import metadata, save_checkpoint, save_lora
from .lora import LoraPatch, attach_lora, kohya_metadata
from .loss import dreambooth_loss
from .memory import adamw_class, check_fused, checkpointing, fused_optimizer, parts_away
from .options import DreamBoothTrainOptions

log = logging.getLogger(__name__)


class DreamBoothMethod:
    """The :class:`~extensions_lib.train.loop.TrainingMethod` of one DreamBooth run."""

    loss_csv_name = "dreambooth_loss.csv"

    def __init__(self, adapter, data: DreamBoothData, options: DreamBoothTrainOptions, provenance: Provenance,
                 lora: LoraPatch | None = None, shard: Shard | None = None):
        self.adapter = adapter
        self.data = data
        self.options = options
        self.provenance = provenance
        self.lora = lora
        self.shard = shard
        self.writer = shard is None or shard.rank == 0
        """Only one process of a data-parallel run writes files."""
        self.name = options.model_name
        self.device = adapter.device
        self.last_losses: tuple[float, float | None] = (0.0, None)
        """(instance, prior) loss of the last micro-batch, for logging and tests."""
        modules = adapter.modules()
        if lora is not None:
            self._params = lora.parameters()
        else:
            trained = [modules["unet"]] + ([modules["text_encoder"]] if options.train_text_encoder else [])
            self._params = [p for m in trained for p in m.parameters()]
        self._cond_cache: dict[str, torch.Tensor] = {}
        self._ema = [p.detach().clone() for p in self._params] if options.ema_decay > 0 else None
        self.fused = None
        """The fused backward+step, when on (its hooks come off when the run ends)."""
        self.away = None
        """The parts moved out of memory during the steps (an OffloadSet), when any."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def after_step(self, step: int) -> None:
        """EMA update, ``ema ← d·ema + (1−d)·w`` (the EMA starts at the initial weights)."""
        if self._ema is not None:
            d = self.options.ema_decay
            with torch.no_grad():
                for e, p in zip(self._ema, self._params):
                    e.mul_(d).add_(p.detach().to(e.device, e.dtype), alpha=1 - d)

    @contextlib.contextmanager
    def _ema_weights(self):
        """The EMA weights in place of the trained ones inside the block (for writing files)."""
        if self._ema is None:
            yield
            return
        # The live weights wait in CPU memory: a full fine-tune's on the device would be a third UNet there.
        saved = [p.detach().to("cpu", copy=True) for p in self._params]
        with torch.no_grad():
            for p, e in zip(self._params, self._ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    p.copy_(s)

    def create_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        make = adamw_class(self.options.use_8bit_adam, self.device)
        if self.options.fused_backward_step:
            self.fused = fused_optimizer(groups, lambda group: make(group, lr=lr), self.options, self.device)
            return self.fused
        return make(groups, lr=lr)

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        from ..prompt import encode_prompts

        if self.options.train_text_encoder:
            return encode_prompts(self.adapter, list(prompts))
        with torch.no_grad():  # frozen text encoder: each prompt is encoded once
            for p in prompts:
                if p not in self._cond_cache:
                    with self.parts_present():
                        self._cond_cache[p] = encode_prompts(self.adapter, [p])[0]
            return torch.stack([self._cond_cache[p] for p in prompts])

    def loss(self, batch: PriorBatch, step: int) -> torch.Tensor:
        # Timesteps and noise are drawn for the whole (global) batch first, so a data-parallel rank that
        # computes a slice of it sees the draws one process would.
        latents = batch.latents.to(self.device)
        timesteps = sample_timesteps(latents.shape[0], batch.generator, num_timesteps=self.adapter.alphas_cumprod.shape[0])
        noise = sample_noise(latents, batch.generator, self.options.noise_offset)
        rows = list(range(latents.shape[0])) if self.shard is None else self.shard.rows(batch)
        n = latents.shape[0] - batch.prior
        total, instance, prior = dreambooth_loss(
            self.adapter, latents[rows], self.conditioning([batch.prompts[r] for r in rows]),
            sum(1 for r in rows if r >= n), self.options.prior_loss_weight, timesteps=timesteps[rows],
            noise=noise[rows], min_snr_gamma=self.options.min_snr_gamma)
        self.last_losses = (instance, prior)
        return total

    # -- resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().cpu().clone() for p in self._params],
                "ema": None if self._ema is None else [e.cpu().clone() for e in self._ema]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if self._ema is not None and state.get("ema") is not None:
            with torch.no_grad():
                for e, saved in zip(self._ema, state["ema"]):
                    e.copy_(saved)
        if len(params) != len(self._params) or any(a.shape != b.shape for a, b in zip(params, self._params)):
            raise AlchemyError("the resume state holds another model or LoRA structure",
                               fix="resume with the options and model the run started with")
        with torch.no_grad():
            for mine, saved in zip(self._params, params):
                mine.copy_(saved)

    # -- files ------------------------------------------------------------------------------------------
    def output_path(self, log_dir: Path, step: int | None) -> Path:
        folder = self.options.lora_dir if self.lora is not None else self.options.checkpoints_dir
        if step is None:
            return Path(folder) / f"{self.name}.safetensors"
        return Path(log_dir) / "models" / f"{self.name}-{step}.safetensors"

    def save(self, path: Path, step: int, optimizer_state: dict | None = None) -> None:
        if not self.writer:
            return
        meta = metadata(self.provenance, self.options, {"alchemy_step": str(step)})
        with self._ema_weights():
            if self.lora is not None:
                o = self.options
                meta.update(kohya_metadata(self.adapter.family, self.name, o.lora_rank, o.lora_alpha))
                save_lora(self.lora, path, meta, fp16=o.save_fp16)
            else:
                with self.parts_present():
                    save_checkpoint(self.adapter, path, meta, fp16=self.options.save_fp16)

    def parts_present(self):
        """The parts moved away back for the block: saving the whole checkpoint, an unforeseen prompt, and any
        preview (which needs the VAE and the text encoder)."""
        return self.away.present_for() if self.away is not None else contextlib.nullcontext()

    def preview(self, step: int, directory: Path) -> Path | None:
        return None


HALF = (torch.float16, torch.bfloat16)


class OriginalWeights:
    """The parameters of `modules` as they are now; :meth:`restore` puts them back, bit for bit and in their
    own dtype.

    The copy (:attr:`saved`, not made when `keep`: the trained weights then stay) lives in CPU memory, in
    each tensor's own dtype: on the compute device it would cost a whole second UNet beside the model, its
    gradients and the optimizer's two moments (the scarce memory), while RAM is plentiful and the copy is
    read only once. Only parameters are kept (training changes no buffer), and they are put back by name, so
    a parameter object a host swapped meanwhile still gets its value.

    :meth:`upcast` makes half-precision parameters float32 in place for the run (the WebUI holds its model in
    float16): an optimizer step of 1e-6 is below float16's resolution of the weights, and the fp16 grad
    scaler refuses float16 gradients; autocast still computes in half precision. In place, so the device
    never holds two copies of a weight."""

    def __init__(self, modules: Sequence[torch.nn.Module], keep: bool = False):
        self.modules = list(modules)
        self.dtypes = [{n: p.dtype for n, p in m.named_parameters()} for m in self.modules]
        self.saved = [] if keep else \
            [(m, {n: p.detach().to("cpu", copy=True) for n, p in m.named_parameters()}) for m in self.modules]

    def upcast(self) -> int:
        """Make the half-precision parameters float32; returns how many there were."""
        count = 0
        for module in self.modules:
            for p in module.parameters():
                if p.dtype in HALF:
                    p.data = p.data.float()
                    count += 1
        return count

    def restore(self) -> None:
        with torch.no_grad():
            for module, dtypes in zip(self.modules, self.dtypes):
                for name, p in module.named_parameters():
                    if name in dtypes and p.dtype != dtypes[name]:
                        p.data = p.data.to(dtypes[name])
            for module, params in self.saved:
                for name, p in module.named_parameters():
                    if name in params:
                        p.copy_(params[name])


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise AlchemyError(f"output name {name!r} cannot be a file name",
                           fix="give --model-name NAME (letters, digits, - and _)")
    return name


def _for_rank(plan: RunPlan, shard: Shard, scratch: Path) -> RunPlan:
    """The plan of one rank: rank 0's seed everywhere; ranks other than 0 write nothing to keep (their log
    folder is a scratch folder)."""
    import torch.distributed as dist

    seed = [plan.options.seed]
    dist.broadcast_object_list(seed, src=0)
    changes: dict[str, Any] = {"seed": seed[0]}
    if plan.options.resume:
        changes["resume"] = resume_state_for(plan.options.resume, shard, scratch)
    if shard.rank != 0:
        changes.update(save_resume_state=False, save_training_settings=False, write_csv_every=0, save_every=0,
                       create_image_every=0, log_directory=str(scratch))
    return RunPlan.of(dataclasses.replace(plan.options, **changes))


def train_dreambooth(adapter, options: DreamBoothTrainOptions | RunPlan, callbacks: Callable | Sequence[Callable] = (),
                     cancel: Any = None, say: Callable[[str], None] | None = None,
                     shard: Shard | None = None, model_reused: bool = True) -> TrainResult:
    """Run DreamBooth with `options` on `adapter`'s model; returns the loop's result.

    model_reused: False when nothing uses the model after the run (the CLI's process ends): full mode then
    keeps no copy of the original weights to restore (a whole second UNet in memory otherwise).

    shard: this process's place in a data-parallel run (:mod:`.distributed`); ``batch_size`` is then per
    process, and every process must call this with the same options."""
    if shard is not None:
        with tempfile.TemporaryDirectory(prefix="alchemy-rank") as scratch:
            return _train(adapter, _for_rank(plan_run(options), shard, Path(scratch)), callbacks, cancel, shard,
                          model_reused)
    return _train(adapter, plan_run(options), callbacks, cancel, None, model_reused)


def _train(adapter, plan: RunPlan, callbacks, cancel, shard: Shard | None, model_reused: bool) -> TrainResult:
    options = plan.options
    _check_name(options.model_name)
    concepts = concepts_from_options(options)
    if options.fused_backward_step:
        check_fused(options, adapter.device)

    def class_images(beat):
        for concept in concepts:
            if concept.with_prior:
                generate_class_images(adapter, concept, options, on_image=lambda _: beat(), cancel=cancel)

    on_rank0(shard, class_images)
    world = 1 if shard is None else shard.world
    with RunSetup(adapter) as setup:
        data = build_dreambooth_data(adapter, dataclasses.replace(options, batch_size=options.batch_size * world),
                                     concepts)
        provenance = collect(adapter, data, source_note=options.source_note, method="dreambooth")
        lora = None
        modules = adapter.modules()
        if options.mode == "lora":
            parts = {"unet": modules["unet"]}
            if options.train_text_encoder:
                parts["text_encoder"] = modules["text_encoder"]
            lora = attach_lora(parts, options.lora_rank, options.lora_alpha, options.lora_dropout, seed=options.seed,
                               device=adapter.device)
            setup.undo_with(lora.remove)
            for layer in lora.layers.values():
                layer.train()  # LoRA dropout on; the model itself stays in eval mode
        else:
            trained = [modules["unet"]] + ([modules["text_encoder"]] if options.train_text_encoder else [])
            originals = OriginalWeights(trained, keep=options.keep_trained_weights or not model_reused)
            setup.undo_with(originals.restore)
            originals.upcast()
            for m in trained:
                m.requires_grad_(True)
        if options.gradient_checkpointing:
            setup.undo_with(checkpointing(modules["unet"]))
        method = DreamBoothMethod(adapter, data, options, provenance, lora, shard)
        setup.undo_with(lambda: method.fused is not None and method.fused.remove())
        if options.offload_unused and setup.may_move_parts:
            method.away = parts_away(adapter, options, data, method.conditioning)
            if method.away is not None:
                setup.move_away(method.away)
        if shard is not None:
            handles = average_gradients(method.parameters(), shard.world)
            setup.undo_with(lambda: [h.remove() for h in handles])
            cancel = StopTogether(cancel)
        result = train(method, plan, callbacks, cancel)
    barrier(shard)
    return result
