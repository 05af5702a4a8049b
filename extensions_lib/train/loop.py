"""The method-agnostic training loop.

A training method (textual inversion, hypernetworks) is a small object implementing
:class:`TrainingMethod`; :func:`train` does everything else: optimizer, learning-rate schedule, gradient
accumulation and clipping, mixed precision, the non-finite guard, progress, cancellation, periodic and
final saves, previews, the loss CSV and plot, the settings JSON and exact resume.

Exact resume: the resume state (``<log>/resume-state.pt``) holds the step, the optimizer (and loss
scaler) state, the method's ``state_dict()``, every RNG the run draws from and the loss history. The data
order is a pure function of (seed, epoch) and the learning rate of the step, so a run stopped at step k
and resumed reaches step n with bit-identical parameters to a run that was never stopped.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from ..atomic import remove_leftovers
from ..errors import AlchemyError
from .batches import Batch, BatchSource
from .guards import SpikeGuard
from .plan import RunPlan
from .provenance import Provenance
from .resume import STATE_FILE, RunCounters, find_resume_state, load_resume_state, restore, save_state
from .rng import LoopRngs, global_rng_preserved
from .run_log import append_csv, log_dir_for, plot_losses, trim_csv, write_settings


class TrainingMethod(Protocol):
    """What a training method provides. Everything model-specific lives here; nothing about the loop does.

    Required
    - ``name``: the run's name (log folder ``<log>/<date>/<name>/``, file names).
    - ``data``: a :class:`~extensions_lib.train.batches.BatchSource`, usually built with
      :func:`~extensions_lib.train.batches.build_training_data`.
    - ``provenance``: a :class:`~extensions_lib.train.provenance.Provenance` (recorded in the settings
      JSON; the method embeds it in the files it writes).
    - ``parameters()``: the trainable tensors (``requires_grad``, kept in float32), or parameter-group
      dicts ``{"params": [...], "lr_scale": 0.5, "weight_decay": 0.0}``. The scheduled rate times
      ``lr_scale`` is written into each group at every step (so a group's multiplier survives schedule
      stages).
    - ``loss(batch, step) -> Tensor``: scalar mean loss of one micro-batch, computed through the model
      adapter (see ``diffusion_loss.denoising_loss``). Draw randomness from ``batch.generator`` (torch)
      so resumes repeat; global-RNG use (dropout) is also restored on resume. Runs under autocast on CUDA.
      TI: encode ``batch.prompts`` with the embedding spliced in, then ``denoising_loss``. Hypernetwork:
      the attention patch is applied before :func:`train` and removed after.
    - ``state_dict() / load_state_dict(state)``: the trainable state (tensors, plain values) for resume.
      ``load_state_dict`` must copy into the tensors ``parameters()`` returned (``p.data.copy_``), not
      replace them: the optimizer already holds those.
    - ``output_path(log_dir, step) -> Path``: where the file of a snapshot at `step` goes (e.g.
      ``log_dir/"embeddings"/f"{name}-{step}.pt"``); ``step=None`` is the final file (e.g. the
      embeddings folder).
    - ``save(path, step, optimizer_state=None)``: write the trained file to `path` atomically.
      `optimizer_state` is given when the user asked to save it: store it where the host format keeps it
      (the WebUI's ``.optim`` side file).
    - ``preview(step, directory) -> Path | None``: render a preview into `directory` (``<log>/images``; called under
      ``torch.no_grad()``; global RNG states are restored afterwards, so previews never change training).

    Optional
    - ``device``: where the loss is computed (default CPU); enables autocast when CUDA.
    - ``create_optimizer(param_groups, lr) -> Optimizer``: e.g. AdamW without weight decay (TI), or the
      optimizer a hypernetwork's ``.optim`` side file names. Default: ``torch.optim.AdamW`` (torch's weight
      decay 0.01 unless a group sets ``weight_decay``).
    - ``after_step(step)``: called after each optimizer step (EMA of embeddings, restoring frozen rows).
    - ``settings_entries() -> dict``: the method's own keys of the settings JSON (the WebUI records e.g. a
      hypernetwork's ``layer_structure`` and ``activation_func`` there).
    - ``loss_csv_name``: file name of the loss CSV (default ``"loss.csv"``; the WebUI uses
      ``textual_inversion_loss.csv`` / ``hypernetwork_loss.csv``).
    Set-up that changes the model (freezing, patches, parts moved out of memory) belongs to whoever builds
    the method, in a :class:`~extensions_lib.train.setup.RunSetup` around :func:`train`.
    """

    name: str
    data: BatchSource
    provenance: Provenance

    def parameters(self) -> Sequence[torch.Tensor] | Sequence[dict]: ...
    def loss(self, batch: Batch, step: int) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def output_path(self, log_dir: Path, step: int | None) -> Path: ...
    def save(self, path: Path, step: int, optimizer_state: dict | None = None) -> None: ...
    def preview(self, step: int, directory: Path) -> Path | None: ...


@dataclass
class Progress:
    """Reported to callbacks after every optimizer step (and once at start and end)."""

    step: int
    """Optimizer steps done."""
    max_steps: int
    """Where this run will stop (max steps, or the end of the learning-rate schedule if earlier)."""
    epoch: int
    epoch_step: int
    loss: float | None
    """Mean loss of the last step's micro-batches (None before the first step)."""
    lr: float
    it_per_s: float
    """Optimizer steps per second over the last few steps."""
    eta_s: float | None
    memory_bytes: int
    memory_kind: str
    """"cuda peak allocated" or "peak RSS"."""
    skipped_nonfinite: int = 0
    last_prompt: str = ""
    saved: Path | None = None
    """Set on the step a file was saved."""
    preview: Path | None = None
    """Set on the step a preview was written."""
    message: str = ""


@dataclass
class TrainResult:
    step: int
    log_dir: Path
    final_path: Path | None
    resume_path: Path | None
    cancelled: bool = False
    interrupted: bool = False
    """Stopped by Ctrl-C (the CLI exits with 130)."""
    skipped_nonfinite: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---- small pieces -----------------------------------------------------------------------------------

def _param_groups(method) -> list[dict]:
    """``method.parameters()`` as optimizer parameter groups, each with an ``lr_scale``."""
    raw = list(method.parameters())
    if raw and isinstance(raw[0], dict):
        groups = [{**g, "params": list(g["params"])} for g in raw]
    else:
        groups = [{"params": raw}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError(f"training method {method.name!r} returned no parameter that requires grad")
    return groups


def _precision(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain float32 (always on CPU)."""
    if device.type != "cuda" or choice == "no":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def _grad_scaler():
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):  # torch >= 2.3
        return amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # torch 2.1/2.2


def _memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda peak allocated"
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS"
    except (ImportError, AttributeError):  # Windows
        return 0, "unknown"


def _total_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    if not norms:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


CTRL_C_REPEAT_S = 2.0
"""A Ctrl-C this soon after the first is the same one: torchrun's agent passes the terminal's Ctrl-C on to
workers that already got it."""


@contextlib.contextmanager
def _ctrl_c_requests_stop(flag: threading.Event):
    """In the main thread, the first Ctrl-C asks the loop to stop at the next step boundary (so the saved
    state is consistent); a second one (after :data:`CTRL_C_REPEAT_S`) interrupts immediately."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    first: list[float] = []

    def handler(signum, frame):
        if not first:
            first.append(time.monotonic())
        if flag.is_set() and time.monotonic() - first[0] > CTRL_C_REPEAT_S:
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
            raise KeyboardInterrupt
        flag.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class _Speed:
    def __init__(self, window: int = 20):
        self.marks: deque[tuple[float, int]] = deque(maxlen=window)

    def mark(self, step: int) -> float:
        self.marks.append((time.perf_counter(), step))
        if len(self.marks) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


class _Stepper:
    """One optimizer step from its micro-batches: autocast, accumulation, the non-finite check, clipping."""

    def __init__(self, method, plan: RunPlan, device: torch.device):
        self.method = method
        self.device_type = device.type
        self.autocast_dtype = _precision(plan.options.mixed_precision, device)
        self.scaler = _grad_scaler() if self.autocast_dtype == torch.float16 else None
        self.clip_mode, self.clip = plan.options.clip_grad_mode, plan.clip
        groups = _param_groups(method)
        self.params = [p for g in groups for p in g["params"]]
        first_lr = plan.learn_rate.entries[0][0]
        for g in groups:
            g["lr"] = first_lr * g["lr_scale"]
        make = getattr(method, "create_optimizer", None)
        self.optimizer = make(groups, first_lr) if make is not None else torch.optim.AdamW(groups, lr=first_lr)
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def step(self, batches: Iterable[Batch], step: int, lr: float) -> float | None:
        """Mean loss of the micro-batches after updating the parameters, or None (nothing changed) when the
        loss or the gradient was not finite."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batches = list(batches)
        total = 0.0
        for batch in batches:
            with self._autocast():
                loss = self.method.loss(batch, step)
            value = loss.detach().float().item()
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            total += value / len(batches)
            scaled = loss / len(batches)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # inf gradients are the scaler's business: it skips the step
        elif not torch.isfinite(_total_grad_norm(self.params)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.clip is not None:
            threshold = self.clip.value_or_last(step)
            if self.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(self.params, threshold)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, threshold)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


# ---- the loop ---------------------------------------------------------------------------------------

def train(method: TrainingMethod, options, callbacks: Callable[[Progress], None] | Sequence[Callable] = (),
          cancel: Any = None) -> TrainResult:
    """Train `method` with `options` (a :class:`~extensions_lib.train.options.TrainingOptions` whose seed is
    resolved, or the :class:`~extensions_lib.train.plan.RunPlan` made of them).

    callbacks: called with a :class:`Progress` after each step. cancel: anything with ``is_set()``
    (``threading.Event``); when set, the loop stops at the next step boundary, saves the trained file and
    the resume state and returns with ``cancelled=True``. Ctrl-C does the same (``interrupted=True``).
    A `cancel` with ``agree(local_stop) -> bool`` is asked at every step boundary whether to stop (processes
    of a data-parallel run stop together). ``options.resume`` continues a stopped run exactly.
    """
    run = _Run(method, options if isinstance(options, RunPlan) else RunPlan.of(options), callbacks)
    with _ctrl_c_requests_stop(run.stop):
        while run.goes_on(cancel):
            run.step()
        # Still inside: a first Ctrl-C while saving must not tear the files being written.
        return run.finish()


class _Run:
    """The state of one :func:`train` call: optimizer, counters, RNGs, log folder, and what a step does."""

    def __init__(self, method: TrainingMethod, plan: RunPlan, callbacks):
        self.method, self.plan, self.options = method, plan, plan.options
        self.callbacks = [callbacks] if callable(callbacks) else list(callbacks)
        self.device = torch.device(getattr(method, "device", "cpu"))
        self.data: BatchSource = method.data
        self.schedule = plan.learn_rate
        self.stepper = _Stepper(method, plan, self.device)
        self.optimizer = self.stepper.optimizer
        self.counters, self.rngs = RunCounters(), LoopRngs(self.options.seed)
        self.stop = threading.Event()
        self.stop_at = plan.stop_at
        self.speed = _Speed()
        self.guard = SpikeGuard(self.stepper.params)
        self.plot_metadata = method.provenance.to_metadata()
        self.warnings = warnings = self._open_log()
        self.plan_epoch, self.epoch_plan = -1, []
        resumed = [f"resumed at step {self.counters.step}"] if self.options.resume else []
        self.report(lr=self.schedule.value_or_last(self.counters.step), message="; ".join(resumed + warnings))

    def goes_on(self, cancel) -> bool:
        stop = self.stop.is_set() or (cancel is not None and cancel.is_set())
        agree = getattr(cancel, "agree", None)  # data-parallel ranks stop together (dreambooth/distributed.py)
        if agree is not None:
            stop = agree(stop)
        return self.counters.step < self.stop_at and not stop

    def _open_log(self) -> list[str]:
        """The log folder (a new one, or the resumed run's with its state restored); warnings of a resume."""
        options, warnings = self.options, []
        if options.resume:
            self.state_path = find_resume_state(options.resume)
            self.log_dir = self.state_path.parent
            warnings = restore(load_resume_state(self.state_path), self.state_path, self.method, options,
                               self.optimizer, self.stepper.scaler, self.rngs, self.counters)
        else:
            self.log_dir = log_dir_for(options.log_directory, self.method.name)
            self.state_path = self.log_dir / STATE_FILE
            self.rngs.seed_globals(options.seed)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for folder, below in ((self.log_dir, True), (self.method.output_path(self.log_dir, None).parent, False)):
            remove_leftovers(folder, recursive=below)  # temporary files of saves killed in an earlier run
        self.initial_step = self.counters.step
        self.csv_path = self.log_dir / getattr(self.method, "loss_csv_name", "loss.csv")
        if options.resume:
            trim_csv(self.csv_path, self.counters.step)
        if options.save_training_settings:
            write_settings(self.log_dir, self.method, options, self.initial_step)
        return warnings

    def report(self, loss=None, lr=0.0, saved=None, preview=None, message="") -> None:
        if not self.callbacks:
            return
        run, spe = self.counters, max(1, self.data.steps_per_epoch)
        rate = self.speed.mark(run.step)
        mem, kind = _memory(self.device)
        p = Progress(step=run.step, max_steps=self.stop_at, epoch=max(run.drawn - 1, 0) // spe,
                     epoch_step=max(run.drawn - 1, 0) % spe, loss=loss, lr=lr, it_per_s=rate,
                     eta_s=(self.stop_at - run.step) / rate if rate > 0 else None, memory_bytes=mem,
                     memory_kind=kind, skipped_nonfinite=run.skipped, last_prompt=run.last_prompt, saved=saved,
                     preview=preview, message=message)
        for cb in self.callbacks:
            cb(p)

    def save_resume(self) -> Path | None:
        if not self.options.save_resume_state:
            return None
        save_state(self.state_path, self.method, self.options, self.optimizer, self.stepper.scaler, self.rngs,
                   self.counters)
        return self.state_path

    def save_file(self, step: int | None) -> Path:
        path = self.method.output_path(self.log_dir, step)
        self.method.save(path, self.counters.step,
                         self.optimizer.state_dict() if self.options.save_optimizer_state else None)
        return path

    def _batches(self, micro_batches):
        for key in micro_batches:
            batch = self.data.make_batch(key, self.rngs.python, self.rngs.torch)
            self.counters.last_prompt = batch.prompts[0] if batch.prompts else ""
            yield batch

    def step(self) -> None:
        """One optimizer step (or a skipped one), then what is due after it: CSV, saves, preview, report."""
        run, options = self.counters, self.options
        epoch, position = divmod(run.drawn, self.data.steps_per_epoch)
        if epoch != self.plan_epoch:
            self.plan_epoch, self.epoch_plan = epoch, self.data.epoch(epoch)
        lr = self.schedule.value_at(run.step)
        step_loss = self.stepper.step(self._batches(self.epoch_plan[position]), run.step, lr)
        run.drawn += 1
        if step_loss is None:
            self._skipped(lr)
            return
        run.step += 1
        run.streak = 0
        spike = self.guard.problem(step_loss)
        if spike is not None:  # nothing more is written: the last good files stay
            raise AlchemyError(f"training stopped at step {run.step}: {spike}", self.log_dir,
                               fix="lower the learning rate (or enable gradient clipping); the files saved "
                                   "before this step are untouched, resume from the last saved state")
        after = getattr(self.method, "after_step", None)
        if after is not None:
            after(run.step)
        run.losses.append((run.step, step_loss))
        if options.write_csv_every and run.step % options.write_csv_every == 0:
            spe = self.data.steps_per_epoch
            append_csv(self.csv_path, [run.step, (run.drawn - 1) // spe, (run.drawn - 1) % spe,
                                       f"{step_loss:.7f}", lr])
        saved = preview = None
        message = ""
        if options.save_every and run.step % options.save_every == 0 and run.step < self.stop_at:
            saved = self.save_file(run.step)
            self.save_resume()
            if not plot_losses(run.losses, self.log_dir / "loss.png", self.method.name, self.plot_metadata):
                message = "loss plot skipped: matplotlib is not installed"
        if options.create_image_every and run.step % options.create_image_every == 0:
            with torch.no_grad(), global_rng_preserved():
                preview = self.method.preview(run.step, self.log_dir / "images")
        self.report(loss=step_loss, lr=lr, saved=saved, preview=preview, message=message)

    def _skipped(self, lr: float) -> None:
        """A step whose loss or gradient was not finite: counted, and too many in a row stop the run."""
        run = self.counters
        run.streak += 1
        run.skipped += 1
        if run.streak >= self.options.max_nonfinite_steps:
            saved = self.save_resume()
            raise AlchemyError(
                f"the loss or its gradient was NaN/inf for {run.streak} steps in a row (at step {run.step})",
                self.log_dir,
                fix="lower the learning rate, train in full precision (mixed precision 'no'), turn off "
                    "xformers/cross-attention optimizations" +
                    (f"; the last good state is in {saved}, resume from it" if saved else ""))
        self.report(lr=lr, message=f"skipped step {run.step + 1}: loss or gradient not finite")

    def finish(self) -> TrainResult:
        """The final (or, when stopped early, the current) file, the resume state, the plot; the result."""
        run, options = self.counters, self.options
        cancelled = run.step < self.stop_at
        if cancelled:
            last_saved = self.save_file(run.step)
            # As the WebUI does on Interrupt: the trained vectors also go to the file in its folder.
            final_path = self.save_file(None) if run.step > self.initial_step else None
        else:
            final_path = last_saved = self.save_file(None)
            if options.save_every and run.step % options.save_every == 0 and run.step > self.initial_step:
                self.save_file(run.step)  # the last periodic copy too, as the WebUI writes both
        resume_path = self.save_resume()
        plotted = plot_losses(run.losses, self.log_dir / "loss.png", self.method.name, self.plot_metadata)
        self.report(loss=run.losses[-1][1] if run.losses else None,
                    lr=self.schedule.value_or_last(max(run.step - 1, 0)), saved=last_saved,
                    message=(f"stopped at step {run.step}" if cancelled else "finished") +
                    ("" if plotted else "; loss plot skipped: matplotlib is not installed"))
        return TrainResult(step=run.step, log_dir=self.log_dir, final_path=final_path, resume_path=resume_path,
                           cancelled=cancelled, interrupted=cancelled and self.stop.is_set(),
                           skipped_nonfinite=run.skipped, losses=run.losses, warnings=self.warnings)
