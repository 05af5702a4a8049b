"""Hypernetwork training over the trainer core (the WebUI's ``train_hypernetwork``).

:func:`train_hypernetwork` loads the hypernetwork from its folder and, in a
:class:`~extensions_lib.train.setup.RunSetup` (no model parameter requires a gradient, every module in eval
mode), attaches the hypernetwork to the attention layers, puts only the hypernetwork in training mode (its
dropout on, multiplier 1) and runs :func:`extensions_lib.train.loop.train` with a
:class:`HypernetworkMethod`; afterwards the patch is removed and the model's flags are restored exactly.

As in the WebUI, the text conditioning is computed once when prompts are static (one template line, no
tag shuffling or dropout) and each step otherwise. What differs, on purpose: the trained file goes back
to the path it was read from (the WebUI writes ``<hypernetwork dir>/<name>.pt`` even when the file came
from a subfolder, which then lists the name twice), files carry our provenance under one extra key the
host's loader ignores, and no gradient checkpointing is switched on (the WebUI's trades speed for memory).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import AlchemyError
from ..formats.torch_pt import save_pt
from ..sampling.infotext import save_png
from ..sampling.txt2img import GenerationOptions, generate_from
from ..train.batches import Batch, build_training_data
from ..train.diffusion_loss import denoising_loss
from ..train.loop import TrainResult, train
from ..train.lr_schedule import Schedule
from ..train.plan import RunPlan, plan_run
from ..train.preview import preview_generation
from ..train.provenance import Provenance, collect
from ..train.rng import global_rng_preserved
from ..train.setup import RunSetup
from .file import optimizer_path, read_hypernetwork, read_optimizer_state, shorthash, to_file_dict
from .library import find
from .module import Hypernetwork
from .patch import HypernetworkPatch, apply_hypernetworks
from .train_options import DEFAULT_LEARN_RATE, HypernetworkTrainOptions

log = logging.getLogger(__name__)

PROVENANCE_KEY = "alchemy"
"""Top-level key of our provenance in a trained ``.pt`` (the host's loader reads only integer keys and its
own metadata keys, so it never sees this one)."""

RISKY_LEARN_RATE = 1e-4
"""Learning rates from here up (10x the WebUI's default of 1e-5 and more) are the range where
hypernetworks are reported to turn into noise, unrecoverably (webui #2269: "the default embedding
[rate] will destroy any existing hypernetwork"; users recommend 5e-7 to 1e-5)."""


def learn_rate_warning(schedule: Schedule) -> str | None:
    """A warning when any rate of the learning-rate schedule is in the range known to destroy hypernetworks."""
    highest = max(rate for rate, _ in schedule.entries)
    if highest < RISKY_LEARN_RATE:
        return None
    return (f"learning rate {highest:g} is in the range known to destroy hypernetworks (from {RISKY_LEARN_RATE:g} "
            f"up the output tends to turn into noise, and the file cannot be repaired); the WebUI's default is "
            f"{float(DEFAULT_LEARN_RATE):g}: use that or lower unless you know this rate works")


def plain_name(name: str) -> str:
    """The hypernetwork name without the `` (hash)`` the WebUI's dropdown appends."""
    return re.sub(r"\s*\([0-9a-fA-F]{8,10}\)$", "", name.strip())


# ---- the model while training -------------------------------------------------------------------------

def attach(hypernetwork: Hypernetwork, adapter, path: Path, say: Callable[[str], None]) -> HypernetworkPatch:
    """Apply `hypernetwork` (strength 1) to the model's attention; an error when no width of it occurs."""
    attention = adapter.attention_modules()
    patch = apply_hypernetworks([(hypernetwork, 1.0)], attention)
    if not patch.applied:
        widths = sorted({attn.to_k.in_features for _, attn in attention})
        raise AlchemyError(f"none of the hypernetwork's module widths {hypernetwork.sizes} occurs in this model, "
                           f"whose attention layers have widths {widths}: it would train nothing", path,
                           fix="create a hypernetwork for this model (SD1: 768, SD2: 1024, and 320/640/1280)")
    if patch.unused:
        say(f"{path}: widths {[w for _, w in patch.unused]} do not occur in this model; those modules stay as they are")
    return patch


def stack_conds(conds: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T_i, C) conditionings -> (B, T, C), padding shorter ones by repeating their last token vector,
    as the WebUI's ``stack_conds`` does for its cached hypernetwork conds."""
    longest = max(c.shape[0] for c in conds)
    return torch.stack([c if c.shape[0] == longest else torch.cat([c, c[-1:].expand(longest - c.shape[0], -1)])
                        for c in conds])


# ---- the training method ------------------------------------------------------------------------------

class HypernetworkMethod:
    """The :class:`~extensions_lib.train.loop.TrainingMethod` of a hypernetwork attached to `adapter`.

    Trains every parameter of the hypernetwork's modules and nothing else: as in the WebUI (whose optimizer
    takes ``Hypernetwork.weights()``), that is the Linear and LayerNorm weights and biases plus the slope of
    a PReLU activation, in the host's order, so ``.optim`` side files resume on either side.
    Static prompts (one template line, no tag shuffling or dropout) are encoded once each and reused.
    """

    loss_csv_name = "hypernetwork_loss.csv"

    def __init__(self, adapter, hypernetwork: Hypernetwork, data, options: HypernetworkTrainOptions,
                 provenance: Provenance, final_path: Path, say: Callable[[str], None] = log.warning):
        self.adapter = adapter
        self.hypernetwork = hypernetwork
        self.name = hypernetwork.name
        self.data = data
        self.options = options
        self.provenance = provenance
        self.final_path = Path(final_path)
        self.device = adapter.device
        self.say = say
        self.base_step = hypernetwork.step
        """The file's step when training began: saved files count on from it, as the WebUI's do."""
        self._params = hypernetwork.parameters()
        self._cond_cache: dict[str, torch.Tensor] | None = {} if getattr(data, "prompts_are_static", False) else None
        self._last_prompt = ""
        self.optimizer_name = "AdamW"

    # -- what trains ------------------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def create_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """The optimizer the ``.pt.optim`` side file names, with its state when the file's hash matches
        (the WebUI's rule); AdamW otherwise."""
        name, state = read_optimizer_state(self.final_path)
        cls = getattr(torch.optim, name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            self.say(f"{optimizer_path(self.final_path)}: unknown optimizer {name!r}; using AdamW")
            cls, state = torch.optim.AdamW, None
        optimizer = cls(groups, lr=lr)
        self.optimizer_name = cls.__name__
        if state is not None:
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError, TypeError) as exc:
                self.say(f"{optimizer_path(self.final_path)}: cannot resume from the saved optimizer state ({exc}); "
                         "starting a fresh one")
        return optimizer

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77*k, C) text conditioning on the model's device (never part of the graph)."""
        from ..prompt import encode_prompts

        with torch.no_grad():
            if self._cond_cache is None:
                cond = encode_prompts(self.adapter, list(prompts), clip_skip=self.options.clip_skip)
            else:
                for prompt in prompts:
                    if prompt not in self._cond_cache:
                        self._cond_cache[prompt] = encode_prompts(self.adapter, [prompt],
                                                                  clip_skip=self.options.clip_skip)[0].cpu()
                cond = stack_conds([self._cond_cache[p] for p in prompts])
        return cond.to(self.adapter.device)

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        self._last_prompt = batch.prompts[0] if batch.prompts else ""
        device = self.adapter.device
        weights = None if batch.weights is None else batch.weights.to(device)
        return denoising_loss(self.adapter, batch.latents.to(device), self.conditioning(batch.prompts),
                              generator=batch.generator, weight=weights, min_snr_gamma=self.options.min_snr_gamma,
                              noise_offset=self.options.noise_offset)

    def settings_entries(self) -> dict[str, Any]:
        """The WebUI's hypernetwork keys of the settings JSON (the structure of the network trained)."""
        hn, arch = self.hypernetwork, self.hypernetwork.arch
        return {"layer_structure": list(arch.layer_structure), "activation_func": arch.activation_func,
                "weight_init": hn.weight_init, "add_layer_norm": arch.add_layer_norm, "use_dropout": hn.use_dropout,
                "save_hypernetwork_every": self.options.save_every}

    # -- resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"base_step": self.base_step, "params": [p.detach().clone() for p in self._params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if len(params) != len(self._params) or any(a.shape != b.shape for a, b in zip(params, self._params)):
            raise AlchemyError("the resume state holds a hypernetwork of another structure", self.final_path,
                               fix="resume with the hypernetwork file the run started from, or start a new run")
        with torch.no_grad():
            for mine, saved in zip(self._params, params):
                mine.copy_(saved)
        self.base_step = int(state["base_step"])

    # -- files ------------------------------------------------------------------------------------------
    def output_path(self, log_dir: Path, step: int | None) -> Path:
        if step is None:
            return self.final_path
        return Path(log_dir) / "hypernetworks" / f"{self.name}-{self.base_step + step}.pt"

    def save(self, path: Path, step: int, optimizer_state: dict | None = None) -> None:
        """Write the host's ``.pt`` layout (+ our provenance key); with `optimizer_state` also the
        ``.pt.optim`` side file keyed to the new file's hash, as the host's "save optimizer state" does."""
        hn = self.hypernetwork
        hn.step = self.base_step + step
        hn.sd_checkpoint = self.provenance.base_model_hash or None
        hn.sd_checkpoint_name = self.provenance.base_model_name or None
        data = to_file_dict(hn)
        data[PROVENANCE_KEY] = self.provenance.to_dict()
        save_pt(data, path)
        if optimizer_state is not None:
            save_pt({"optimizer_name": self.optimizer_name, "hash": shorthash(path),
                     "optimizer_state_dict": optimizer_state}, optimizer_path(path))

    def preview_options(self) -> GenerationOptions:
        return preview_generation(self.options, self._last_prompt or self.name)

    def preview(self, step: int, directory: Path) -> Path | None:
        """One txt2img image with the hypernetwork applied (eval mode: no dropout, its multiplier)."""
        hn = self.hypernetwork
        with global_rng_preserved():  # previews must not change what training draws next
            hn.eval()
            try:
                image = generate_from(self.adapter, self.preview_options(), extra_params={"Hypernet": hn.name})[0]
            finally:
                hn.train()
        path = Path(directory) / f"{self.name}-{self.base_step + step}.png"
        save_png(image, path)
        return path


# ---- the whole run ------------------------------------------------------------------------------------

def load_for_training(options: HypernetworkTrainOptions) -> tuple[Hypernetwork, Path]:
    """The hypernetwork `options` names, read fresh from its folder, and its path."""
    name = plain_name(options.hypernetwork_name)
    if not name:
        raise AlchemyError("no hypernetwork to train", fix="give its name (create one first with "
                                                            "'alchemy hypernetwork create --name NAME')")
    path = find(options.hypernetwork_dir, name)
    hn = read_hypernetwork(path)
    hn.name = name  # as in the host: the run, its files and [name] use the name it was picked by
    return hn, path


def train_hypernetwork(adapter, options: HypernetworkTrainOptions | RunPlan,
                       callbacks: Callable | Sequence[Callable] = (), cancel: Any = None,
                       say: Callable[[str], None] | None = None) -> TrainResult:
    """Train the hypernetwork `options` names on `adapter`'s model; returns the loop's result. `options`
    may be the :class:`~extensions_lib.train.plan.RunPlan` made of them (a seed of -1 is resolved here).

    say: where warnings go as they arise (default: logging); they are also in ``result.warnings``.
    ``options.resume`` continues a stopped run exactly (build the options with
    :func:`extensions_lib.train.resume.resume_options`).
    """
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        (say or log.warning)(message)

    plan = plan_run(options)
    options = plan.options
    risky = learn_rate_warning(plan.learn_rate)
    if risky:
        note(risky)
    hn, path = load_for_training(options)
    with RunSetup(adapter) as setup:
        data = build_training_data(adapter, options, name=hn.name, require_name=False)
        provenance = collect(adapter, data.dataset, source_note=options.source_note, method="hypernetwork")
        setup.undo_with(hn.eval)
        setup.undo_with(attach(hn, adapter, path, note).unpatch)
        hn.set_multiplier(1.0)
        hn.train()
        method = HypernetworkMethod(adapter, hn, data, options, provenance, final_path=path, say=note)
        result = train(method, plan, callbacks, cancel)
    result.warnings[:0] = warnings
    return result
