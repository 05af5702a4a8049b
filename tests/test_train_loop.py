"""The training loop: accumulation, clipping, the non-finite guard, schedules, saving, cancel and exact resume."""
from __future__ import annotations

import csv
import dataclasses
import json
import signal
import threading

import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.options import from_dict
from extensions_lib.train.batches import build_training_data
from extensions_lib.train.loop import train
from extensions_lib.train.options import TrainingOptions, resolve_seed
from extensions_lib.train.resume import load_resume_state, resume_options
from train_fakes import CondMethod, FakeAdapter, LinearMethod, ToyData, make_folder, write_image


def opts(tmp_path, **kw):
    base = dict(seed=1, steps=20, learn_rate="0.05", log_directory=str(tmp_path / "logs"), save_every=0,
                create_image_every=0, write_csv_every=1)
    base.update(kw)
    return TrainingOptions(**base)


class SGD:
    """create_optimizer hook: plain SGD, so an update shows the (clipped) gradient itself."""

    def __call__(self, groups, lr):
        return torch.optim.SGD(groups, lr=lr)


def test_loss_falls_on_a_linear_fit(tmp_path):
    method = LinearMethod(ToyData(n=16, batch_size=4))
    result = train(method, opts(tmp_path, steps=150))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert result.step == 150 and not result.cancelled
    assert last < 0.01 * first
    assert torch.allclose(method.w.detach(), method.data.w_true, atol=0.05)


def test_accumulation_equals_a_larger_batch(tmp_path):
    big = LinearMethod(ToyData(n=10, batch_size=4, gradient_step=1))
    acc = LinearMethod(ToyData(n=10, batch_size=2, gradient_step=2))
    train(big, opts(tmp_path / "a", steps=12, batch_size=4))
    train(acc, opts(tmp_path / "b", steps=12, batch_size=2, gradient_step=2))
    assert torch.allclose(big.w.detach(), acc.w.detach(), rtol=0, atol=1e-12)
    assert not torch.equal(big.w.detach(), torch.zeros_like(big.w))


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_gradient_clipping(tmp_path, mode):
    data = ToyData(n=4, batch_size=4)
    method = LinearMethod(data)
    method.create_optimizer = SGD()
    # an independent gradient of the first step (the batch is all four samples, in some order)
    w = torch.zeros_like(data.w_true, requires_grad=True)
    ((data.x @ w.T - data.y) ** 2).mean().backward()
    g = w.grad
    threshold = 0.05
    if mode == "value":
        expected = g.clamp(-threshold, threshold)
    else:
        expected = g * min(1.0, threshold / (float(g.norm()) + 1e-6))
    train(method, opts(tmp_path, steps=1, learn_rate="1.0", clip_grad_mode=mode, clip_grad_value=str(threshold)))
    assert torch.allclose(method.w.detach(), -expected, atol=1e-12)
    assert float(g.abs().max()) > threshold  # clipping did something


def test_clip_value_follows_its_schedule(tmp_path):
    data = ToyData(n=4, batch_size=4)
    seen = []
    method = LinearMethod(data)
    method.create_optimizer = SGD()
    original = torch.nn.utils.clip_grad_value_

    def spy(params, value):
        seen.append(value)
        return original(params, value)

    torch.nn.utils.clip_grad_value_ = spy
    try:
        train(method, opts(tmp_path, steps=4, clip_grad_mode="value", clip_grad_value="0.5:2, 0.1:3"))
    finally:
        torch.nn.utils.clip_grad_value_ = original
    assert seen == [0.5, 0.5, 0.1, 0.1]  # the last value is kept after the clip schedule ends


def test_lr_schedule_is_applied_per_step_and_ends_training(tmp_path):
    lrs = []
    result = train(LinearMethod(ToyData()), opts(tmp_path, steps=100, learn_rate="0.1:3, 0.01:5"),
                   callbacks=lambda p: lrs.append((p.step, p.lr)) if p.loss is not None and p.message == "" else None)
    assert result.step == 5  # the schedule ended before max steps
    assert lrs == [(1, 0.1), (2, 0.1), (3, 0.1), (4, 0.01), (5, 0.01)]
    with open(result.log_dir / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["learn_rate"]) for r in rows] == [0.1, 0.1, 0.1, 0.01, 0.01]


def test_param_group_lr_scale_survives_schedule_stages(tmp_path):
    data = ToyData()
    method = LinearMethod(data)
    method.parameters = lambda: [{"params": [method.w], "lr_scale": 0.5}]
    seen = []
    method.after_step = lambda step: seen.append(optimizer_lr(method))
    holder = {}

    def make(groups, lr):
        holder["opt"] = torch.optim.SGD(groups, lr=lr)
        return holder["opt"]

    def optimizer_lr(_):
        return holder["opt"].param_groups[0]["lr"]

    method.create_optimizer = make
    train(method, opts(tmp_path, steps=4, learn_rate="0.2:2, 0.02"))
    assert seen == [0.1, 0.1, 0.01, 0.01]


def test_non_finite_steps_are_skipped(tmp_path):
    method = LinearMethod(ToyData(), nan_at={2}, inf_grad_at={4})
    before = {}
    method.after_step = lambda step: before.setdefault(step, method.w.detach().clone())
    messages = []
    result = train(method, opts(tmp_path, steps=8), callbacks=lambda p: messages.append(p.message))
    assert result.step == 8 and result.skipped_nonfinite == 2
    assert method.loss_steps.count(2) == 2 and method.loss_steps.count(4) == 2  # retried with the next batch
    assert sum("not finite" in m for m in messages) == 2
    assert all(torch.isfinite(w).all() for w in before.values())


def test_non_finite_streak_stops_with_a_clear_error(tmp_path):
    method = LinearMethod(ToyData(), nan_from=3)
    with pytest.raises(AlchemyError, match="NaN/inf for 4 steps in a row") as info:
        train(method, opts(tmp_path, max_nonfinite_steps=4, save_resume_state=True))
    assert "lower the learning rate" in str(info.value) and "resume-state.pt" in str(info.value)
    state = load_resume_state(tmp_path / "logs" / next((tmp_path / "logs").iterdir()).name / "linear")
    assert state["step"] == 3 and torch.isfinite(state["method"]["w"]).all()


def test_saves_previews_csv_settings_and_plot(tmp_path):
    method = LinearMethod(ToyData())
    options = opts(tmp_path, steps=10, save_every=4, create_image_every=5, write_csv_every=3,
                   save_optimizer_state=True, source_note="own photos")
    result = train(method, options)
    log = result.log_dir
    assert log.parent.parent == tmp_path / "logs" and log.name == "linear" and len(log.parent.name) == 10
    assert [(p.name, s) for p, s, _ in method.saved] == [("linear-4.pt", 4), ("linear-8.pt", 8), ("linear.pt", 10)]
    assert all(o is not None and "state" in o for _, _, o in method.saved)
    assert result.final_path == log / "snapshots" / "linear.pt" and result.final_path.is_file()
    assert method.previews == [5, 10]
    with open(log / "loss.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step", "epoch", "epoch_step", "loss", "learn_rate"]
    assert [int(r[0]) for r in rows[1:]] == [3, 6, 9]
    spe = method.data.steps_per_epoch
    assert [(int(r[1]), int(r[2])) for r in rows[1:]] == [((s - 1) // spe, (s - 1) % spe) for s in (3, 6, 9)]
    assert [float(r[3]) for r in rows[1:]] == [round(result.losses[s - 1][1], 7) for s in (3, 6, 9)]
    settings_files = list(log.glob("settings-*.json"))
    assert len(settings_files) == 1
    settings = json.loads(settings_files[0].read_text())
    for key in ("learn_rate", "batch_size", "gradient_step", "data_root", "log_directory", "template_file",
                "training_width", "training_height", "steps", "clip_grad_mode", "clip_grad_value",
                "latent_sampling_method", "create_image_every", "model_name", "model_hash",
                "num_of_dataset_images", "initial_step", "datetime"):
        assert key in settings
    assert settings["model_hash"] == "0123456789" and settings["provenance"]["source_note"] == ""
    assert from_dict(TrainingOptions, settings) == options
    assert (log / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(log / "loss.png") as plot:     # the plot records where the run came from, too
        assert {k: plot.text.get(k) for k in method.provenance.to_metadata()} == method.provenance.to_metadata()


def test_cancel_token_saves_and_stops(tmp_path):
    method = LinearMethod(ToyData())
    cancel = threading.Event()
    result = train(method, opts(tmp_path, steps=50), callbacks=lambda p: cancel.set() if p.step == 6 else None,
                   cancel=cancel)
    assert result.cancelled and not result.interrupted and result.step == 6
    # the snapshot in the log folder, then (as the WebUI does on Interrupt) the file in its own folder
    assert [s[0].name for s in method.saved[-2:]] == ["linear-6.pt", "linear.pt"] and result.final_path.is_file()
    for path, _, _ in method.saved[-2:]:
        saved = torch.load(path, weights_only=True)
        assert torch.equal(saved["w"], method.w.detach()) and saved["step"] == 6
    assert load_resume_state(result.log_dir)["step"] == 6


def test_ctrl_c_stops_at_a_step_boundary_and_saves(tmp_path):
    method = LinearMethod(ToyData())

    def press_ctrl_c(p):
        if p.step == 3 and p.loss is not None and not p.message:
            signal.raise_signal(signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    result = train(method, opts(tmp_path, steps=50), callbacks=press_ctrl_c)
    assert result.cancelled and result.interrupted and result.step == 3
    assert load_resume_state(result.resume_path)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # our handler is gone again


def _cond_run(tmp_path, folder, **kw):
    options = TrainingOptions(
        data_root=str(folder), template_file="subject_filewords", varsize=True, seed=5, steps=14,
        learn_rate="0.05:6, 0.02", log_directory=str(tmp_path / "logs"), shuffle_tags=True, tag_drop_out=0.3,
        latent_sampling_method="random", batch_size=2, gradient_step=2, clip_grad_mode="norm",
        clip_grad_value="0.5", save_every=4, create_image_every=3, write_csv_every=1, use_weight=True)
    return dataclasses.replace(options, **kw)


def _cond_method(options):
    adapter = FakeAdapter()
    return CondMethod(build_training_data(adapter, options, name="tok", require_name=True), adapter)


def test_resume_is_exact(tmp_path):
    folder = make_folder(tmp_path / "data", 5)
    write_image(folder / "wide.png", size=(128, 64), seed=7)
    alpha = torch.zeros(64, 64, dtype=torch.uint8)
    alpha[:, :40] = 255
    write_image(folder / "alpha.png", alpha=alpha.numpy(), seed=8)

    straight = _cond_method(_cond_run(tmp_path / "a", folder))
    whole = train(straight, _cond_run(tmp_path / "a", folder))

    cancel = threading.Event()
    first = _cond_method(_cond_run(tmp_path / "b", folder))
    stopped = train(first, _cond_run(tmp_path / "b", folder), cancel=cancel,
                    callbacks=lambda p: cancel.set() if p.step == 7 else None)
    assert stopped.cancelled and stopped.step == 7
    torch.manual_seed(999)  # a new process would start with other global RNG states

    options = resume_options(stopped.log_dir, TrainingOptions)
    assert options.seed == 5 and options.resume.endswith("resume-state.pt")
    second = _cond_method(options)
    resumed = train(second, options)

    assert resumed.step == whole.step == 14 and resumed.warnings == []
    assert torch.equal(second.vec, straight.vec)
    assert resumed.losses == whole.losses
    assert (resumed.log_dir / "loss.csv").read_text() == (whole.log_dir / "loss.csv").read_text()
    a, b = load_resume_state(whole.log_dir), load_resume_state(resumed.log_dir)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["optimizer"]["state"][0][key], b["optimizer"]["state"][0][key])
    assert second.previews == [9, 12]


def test_resume_refuses_a_changed_dataset_and_warns_on_changed_options(tmp_path):
    folder = make_folder(tmp_path / "data", 4)
    options = _cond_run(tmp_path, folder, steps=4)
    first = train(_cond_method(options), options)
    again = resume_options(first.log_dir, TrainingOptions, {"steps": 6, "tag_drop_out": 0.5})
    result = train(_cond_method(again), again)
    assert result.step == 6 and any("tag_drop_out" in w for w in result.warnings)
    (folder / "img0.txt").write_text("a different caption")
    again = resume_options(first.log_dir, TrainingOptions, {"steps": 8})
    with pytest.raises(AlchemyError, match="dataset changed") as info:
        train(_cond_method(again), again)
    assert str(folder) in str(info.value)


def test_resume_from_a_missing_or_foreign_file_is_named(tmp_path):
    with pytest.raises(AlchemyError, match="no resume state") as info:
        resume_options(tmp_path / "nowhere", TrainingOptions)
    assert "nowhere" in str(info.value)
    bogus = tmp_path / "resume-state.pt"
    torch.save({"hello": 1}, bogus)
    with pytest.raises(AlchemyError, match="not an Alchemy resume state"):
        load_resume_state(bogus)
    bogus.write_bytes(b"garbage")
    with pytest.raises(AlchemyError, match="cannot be read"):
        load_resume_state(tmp_path)


def test_seed_must_be_resolved(tmp_path):
    with pytest.raises(ValueError, match="resolve_seed"):
        train(LinearMethod(ToyData()), opts(tmp_path, seed=-1))
    resolved = resolve_seed(opts(tmp_path, seed=-1))
    assert resolved.seed >= 0 and resolve_seed(resolved) is resolved


def test_progress_reports_speed_eta_and_memory(tmp_path):
    seen = []
    train(LinearMethod(ToyData()), opts(tmp_path, steps=6), callbacks=[seen.append])
    steps = [p for p in seen if p.loss is not None and p.message == ""]
    assert [p.step for p in steps] == [1, 2, 3, 4, 5, 6]
    assert all(p.max_steps == 6 and p.lr == 0.05 and p.memory_bytes > 0 for p in steps)
    assert steps[-1].it_per_s > 0 and steps[-2].eta_s is not None and steps[-1].eta_s == 0
    assert seen[-1].message == "finished"


def test_previews_do_not_change_training(tmp_path):
    folder = make_folder(tmp_path / "data", 4)
    with_previews = _cond_method(_cond_run(tmp_path / "a", folder, steps=6))
    train(with_previews, _cond_run(tmp_path / "a", folder, steps=6, create_image_every=1))
    without = _cond_method(_cond_run(tmp_path / "b", folder, steps=6))
    train(without, _cond_run(tmp_path / "b", folder, steps=6, create_image_every=0))
    assert with_previews.previews == [1, 2, 3, 4, 5, 6] and without.previews == []
    assert torch.equal(with_previews.vec, without.vec)


def test_cancel_from_another_thread_while_training_in_a_worker(tmp_path):
    method = LinearMethod(ToyData())
    cancel, reached, out = threading.Event(), threading.Event(), {}

    def on_step(p):
        if p.step >= 2:
            reached.set()
            cancel.wait(5)  # hold the worker until the "UI" has pressed stop

    worker = threading.Thread(target=lambda: out.setdefault("r", train(method, opts(tmp_path, steps=1000),
                                                                      callbacks=on_step, cancel=cancel)))
    worker.start()
    assert reached.wait(30)
    cancel.set()
    worker.join(30)
    result = out["r"]
    assert result.cancelled and not result.interrupted and 2 <= result.step < 1000
    assert load_resume_state(result.log_dir)["step"] == result.step


def test_without_matplotlib_the_plot_is_skipped_and_said(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    seen = []
    result = train(LinearMethod(ToyData()), opts(tmp_path, steps=3), callbacks=seen.append)
    assert not (result.log_dir / "loss.png").exists()
    assert "matplotlib is not installed" in seen[-1].message


def test_loss_scaler_path(tmp_path, monkeypatch):
    """The fp16 branch (CUDA in real use) run on the CPU: scaled backward, unscale before clipping, the
    scaler skipping an infinite-gradient step by itself, and its state in an exact resume."""
    from extensions_lib.train import loop

    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler('cpu') needs torch >= 2.3")
    monkeypatch.setattr(loop, "_precision", lambda choice, device: torch.float16)
    monkeypatch.setattr(loop, "_grad_scaler", lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    scales = []

    def run(path, steps, cancel_at=None, resume=""):
        method = LinearMethod(ToyData(dtype=torch.float32), inf_grad_at={3})
        cancel = threading.Event()

        def on_step(p):
            if cancel_at is not None and p.step == cancel_at:
                cancel.set()

        options = opts(path, steps=steps, clip_grad_mode="norm", clip_grad_value="10", resume=resume)
        return method, train(method, options, callbacks=on_step, cancel=cancel)

    straight, whole = run(tmp_path / "a", 60)
    assert whole.skipped_nonfinite == 0  # the scaler, not our guard, handles infinite gradients
    first, last = [sum(v for _, v in part) / 8 for part in (whole.losses[:8], whole.losses[-8:])]
    assert last < 0.2 * first
    scales.append(load_resume_state(whole.log_dir)["scaler"]["scale"])
    assert scales[0] < 2.0 ** 10  # it backed off after the infinite gradient
    _, stopped = run(tmp_path / "b", 60, cancel_at=12)
    second, resumed = run(tmp_path / "b", 60, resume=str(stopped.log_dir))
    assert torch.equal(second.w, straight.w) and resumed.losses == whole.losses
