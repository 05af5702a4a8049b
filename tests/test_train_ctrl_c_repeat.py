"""A Ctrl-C repeated at once (torchrun's agent passing the terminal's Ctrl-C on to its workers) still stops
the loop cleanly at a step boundary; a second Ctrl-C later interrupts at once."""
from __future__ import annotations

import signal

import pytest

from extensions_lib.train import loop
from extensions_lib.train.loop import train
from extensions_lib.train.options import TrainingOptions
from extensions_lib.train.resume import load_resume_state
from train_fakes import LinearMethod, ToyData


def _options(tmp_path):
    return TrainingOptions(seed=1, steps=50, learn_rate="0.05", log_directory=str(tmp_path / "logs"), save_every=0,
                           create_image_every=0, write_csv_every=1)


def _press_twice_at(step):
    def press(p):
        if p.step == step and p.loss is not None and not p.message:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
    return press


def test_a_repeated_ctrl_c_stops_at_the_step_boundary(tmp_path):
    result = train(LinearMethod(ToyData()), _options(tmp_path), callbacks=_press_twice_at(3))
    assert result.interrupted and result.step == 3
    assert load_resume_state(result.resume_path)["step"] == 3


def test_a_later_second_ctrl_c_interrupts_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CTRL_C_REPEAT_S", -1.0)
    with pytest.raises(KeyboardInterrupt):
        train(LinearMethod(ToyData()), _options(tmp_path), callbacks=_press_twice_at(3))
