"""The host-agnostic job plumbing: the standalone runner, progress records and the JSON the browser polls."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from extensions_lib.errors import AlchemyError, Cancelled
from extensions_lib.host.jobs import HostJobRunner
from extensions_lib.train.loop import train
from extensions_lib.train.options import TrainingOptions
from extensions_lib.jobs.progress import (JobContext, ProgressBoard, downsample, format_duration, progress_payload,
                                        run_job, status_line)
from extensions_lib.jobs.thread_runner import ThreadJobRunner
from train_fakes import LinearMethod, ToyData


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


RUNNERS = pytest.mark.parametrize("make_runner", [ThreadJobRunner, HostJobRunner], ids=["standalone", "webui"])


def gated_job(gate: threading.Event, steps: int = 3):
    """A job that reports `steps` steps, then waits for `gate` (or a stop request) before finishing."""
    def job_fn(options, job: JobContext):
        for i in range(1, steps + 1):
            job.update(step=i, total=steps + 1, message=f"step {i} of {options}")
        while not gate.is_set() and not job.should_stop():
            time.sleep(0.002)
        return "result" if not job.should_stop() else "stopped"
    return job_fn


def test_job_runs_in_the_background_and_records_its_result():
    runner = ThreadJobRunner()
    gate = threading.Event()
    job_id = runner.start(gated_job(gate), "opts", title="toy job", panel="tagger")
    wait_until(lambda: runner.progress().step == 3)
    p = runner.progress()
    assert (p.job_id, p.state, p.title, p.panel, p.total) == (job_id, "running", "toy job", "tagger", 4)
    assert p.message == "step 3 of opts" and p.active
    gate.set()
    final = runner.wait(job_id, timeout=10)
    assert final.state == "done" and final.result == "result" and not final.active and final.finished_at > 0


def test_a_second_job_is_refused_clearly_and_the_first_keeps_running():
    runner = ThreadJobRunner()
    gate = threading.Event()
    first = runner.start(gated_job(gate), "a", title="training embedding foo")
    wait_until(lambda: runner.progress().step == 3)
    ran = []
    with pytest.raises(AlchemyError) as info:
        runner.start(lambda o, j: ran.append(o), "b", title="second")
    assert "another job is running: training embedding foo" in info.value.message
    assert "Interrupt" in info.value.fix
    assert runner.progress().job_id == first and runner.progress().state == "running" and ran == []
    gate.set()
    assert runner.wait(first, timeout=10).state == "done"
    # once it ended, the next job starts
    assert run_job(runner, lambda o, j: o * 2, 21, title="next").result == 42


def test_interrupt_stops_the_job_and_marks_it_cancelled():
    runner = ThreadJobRunner()
    assert runner.interrupt() is False  # nothing runs
    job_id = runner.start(gated_job(threading.Event()), "x", title="long")
    wait_until(lambda: runner.progress().step == 3)
    assert runner.interrupt() is True
    assert runner.progress().state in ("stopping", "cancelled")
    final = runner.wait(job_id, timeout=10)
    assert final.state == "cancelled" and final.result == "stopped"


@RUNNERS
def test_pressing_interrupt_again_while_the_job_saves_is_not_told_nothing_runs(make_runner):
    runner = make_runner()
    saving, release = threading.Event(), threading.Event()

    def job_fn(options, job):
        job.update(step=1, total=2)
        while not job.should_stop():
            time.sleep(0.002)
        saving.set()
        release.wait(10)  # writing what it has
        return "saved"

    job_id = runner.start(job_fn, None, title="long")
    wait_until(lambda: runner.progress().step == 1)
    assert runner.interrupt() is True
    saving.wait(10)
    assert runner.progress().state == "stopping" and runner.interrupt() is True
    release.set()
    assert runner.wait(job_id, timeout=10).state == "cancelled"
    assert runner.interrupt() is False  # now nothing runs


@pytest.mark.parametrize("exc, expected", [
    (AlchemyError("dataset folder not found", "/data/x", "type an existing folder"),
     "/data/x: dataset folder not found (type an existing folder)"),
    (ValueError("boom"), "unexpected error: ValueError: boom (details in the console log)"),
])
def test_a_failing_job_reports_the_error(exc, expected):
    def job_fn(options, job):
        job.update(step=1, total=5)
        raise exc

    final = run_job(ThreadJobRunner(), job_fn, None, title="bad")
    assert final.state == "failed" and final.error == expected and final.step == 1
    assert status_line(final) == f"Failed: bad (1/5 steps): {expected}"


def test_cancelled_raised_by_the_job_counts_as_stopped():
    def job_fn(options, job):
        raise Cancelled()

    assert run_job(ThreadJobRunner(), job_fn, None, title="c").state == "cancelled"


def test_trainer_progress_reaches_the_board_exactly(tmp_path):
    """A real trainer-core run through the runner: the loss curve is the run's own loss history."""
    method = LinearMethod(ToyData(n=8, batch_size=2))
    options = TrainingOptions(seed=3, steps=12, learn_rate="0.05", log_directory=str(tmp_path / "logs"), save_every=0,
                              create_image_every=5, write_csv_every=0)

    def job_fn(opts, job):
        return train(method, opts, callbacks=[job.train_callback], cancel=job.cancel)

    final = run_job(ThreadJobRunner(), job_fn, options, title="toy training", panel="train_embedding")
    result = final.result
    assert final.state == "done" and result.step == 12 and not result.cancelled
    assert final.loss_points == [(s, v) for s, v in result.losses]
    assert (final.step, final.total, final.loss) == (12, 12, result.losses[-1][1])
    # previews at steps 5 and 10: the latest is on the board, its version counts both
    assert final.preview is not None and final.preview.name == "linear-10.txt" and final.preview_version == 2


def test_interrupting_a_training_job_saves_and_stops_at_a_step_boundary(tmp_path):
    method = LinearMethod(ToyData(n=8, batch_size=2))
    options = TrainingOptions(seed=3, steps=100000, learn_rate="0.01", log_directory=str(tmp_path / "logs"),
                              save_every=0, create_image_every=0, write_csv_every=0)
    runner = ThreadJobRunner()
    job_id = runner.start(lambda o, job: train(method, o, callbacks=[job.train_callback], cancel=job.cancel), options,
                          title="long training")
    wait_until(lambda: runner.progress().step >= 5)
    runner.interrupt()
    final = runner.wait(job_id, timeout=30)
    result = final.result
    assert final.state == "cancelled" and result.cancelled and 5 <= result.step < 100000
    assert method.saved[-1][0].name == f"linear-{result.step}.pt" and method.saved[-1][0].is_file()
    assert final.loss_points == [(s, v) for s, v in result.losses]


class InterruptingSave(LinearMethod):
    """Presses Interrupt on its runner while it is writing the file of step `at`."""

    def __init__(self, data, runner, at):
        super().__init__(data)
        self.runner, self.at, self.asked = runner, at, None

    def save(self, path, step, optimizer_state=None):
        if step == self.at and self.asked is None:
            self.asked = self.runner.interrupt()
        super().save(path, step, optimizer_state)


def _toy_run(runner, method, options):
    return run_job(runner, lambda o, job: train(method, o, callbacks=[job.train_callback], cancel=job.cancel),
                   options, title="toy training", panel="train_embedding")


def _interrupted_at_save(tmp_path, make_runner, at: int):
    """A 10-step toy run, saving every 4 steps, interrupted from inside the save of step `at`."""
    options = TrainingOptions(seed=3, steps=10, learn_rate="0.05", log_directory=str(tmp_path / "logs"), save_every=4,
                              create_image_every=0, write_csv_every=0)
    runner = make_runner()
    method = InterruptingSave(ToyData(n=8, batch_size=2), runner, at=at)
    return options, method, _toy_run(runner, method, options)


@RUNNERS
def test_interrupt_during_a_periodic_save_keeps_that_file_and_the_run_resumes_exactly(tmp_path, make_runner):
    options, method, final = _interrupted_at_save(tmp_path, make_runner, at=4)
    result = final.result
    assert method.asked is True
    assert final.state == "cancelled" and result.cancelled and result.step == 4
    snapshot = torch.load(result.log_dir / "snapshots" / "linear-4.pt")
    assert snapshot["step"] == 4 and torch.equal(snapshot["w"], method.w.detach())  # written whole
    assert not list(result.log_dir.rglob("*.tmp*"))
    # nothing lost: resuming ends exactly where an uninterrupted run ends
    resumed = LinearMethod(ToyData(n=8, batch_size=2))
    train(resumed, dataclasses.replace(options, resume=str(result.resume_path)))
    straight = LinearMethod(ToyData(n=8, batch_size=2))
    train(straight, dataclasses.replace(options, log_directory=str(tmp_path / "straight")))
    assert torch.equal(resumed.w, straight.w)


@RUNNERS
def test_interrupt_during_the_final_save_reports_the_finished_run(tmp_path, make_runner):
    """The Interrupt came too late to cut the run short: it finished, and the tab must say so."""
    _options, method, final = _interrupted_at_save(tmp_path, make_runner, at=10)
    result = final.result
    assert method.asked is True and not result.cancelled and result.step == 10
    assert final.state == "done" and status_line(final).startswith("Finished: toy training (10/10 steps")
    assert torch.load(result.final_path)["step"] == 10


def test_speed_and_eta_come_from_the_updates():
    board = ProgressBoard()
    board.begin("j", "t", "p")
    job = JobContext(board, threading.Event())
    job.update(step=0, total=100)
    time.sleep(0.05)
    job.update(step=10)
    p = board.snapshot()
    assert 10 / 0.5 < p.it_per_s < 10 / 0.049  # 10 steps in a bit over 0.05 s
    assert p.eta_s == pytest.approx(90 / p.it_per_s)


def test_counter_callback_reports_images():
    board = ProgressBoard()
    board.begin("j", "t", "p")
    JobContext(board, threading.Event()).counter("image")(3, 7)
    p = board.snapshot()
    assert (p.step, p.total, p.unit) == (3, 7, "image")


def test_repeated_steps_replace_the_curve_tail():
    board = ProgressBoard()
    for step, loss in [(1, 1.0), (2, 0.9), (3, 0.8), (2, 0.5), (3, 0.4)]:
        board.add_loss(step, loss)
    assert board.snapshot().loss_points == [(1, 1.0), (2, 0.5), (3, 0.4)]


def test_downsample_averages_buckets_and_keeps_the_last_step():
    points = [(s, float(s % 7)) for s in range(1, 1001)]
    out = downsample(points, 100)
    assert len(out) == 100 and out[-1][0] == 1000
    for b, (step, value) in enumerate(out):  # independent computation: bucket b holds points 10b..10b+9
        bucket = points[10 * b:10 * b + 10]
        assert step == bucket[-1][0] and value == pytest.approx(sum(v for _, v in bucket) / 10)
    assert downsample(points[:5], 100) == points[:5]


def test_payload_holds_what_the_browser_shows():
    board = ProgressBoard()
    board.begin("job-7", "Training embedding cat", "train_embedding")
    board.update(step=30, total=120, loss=0.25, it_per_s=2.0, eta_s=45.0, message="saved x")
    board.add_loss(30, 0.25)
    payload = progress_payload(board.snapshot())
    assert payload["fraction"] == 0.25 and payload["eta"] == "0:45" and payload["active"] is True
    assert payload["loss_points"] == [(30, 0.25)] and payload["preview_version"] == 0
    assert payload["panel"] == "train_embedding" and payload["job_id"] == "job-7"
    assert [format_duration(s) for s in (None, 0, 75, 3725)] == ["?", "0:00", "1:15", "1:02:05"]
