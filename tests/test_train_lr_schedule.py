"""The learning-rate schedule matches the WebUI's iterator rules step by step, and bad text is named."""
from __future__ import annotations

import pytest

from extensions_lib.errors import AlchemyError
from extensions_lib.train.lr_schedule import parse_schedule


def webui_rates(text: str, max_steps: int, initial_step: int = 0) -> list[float]:
    """The WebUI's LearnScheduleIterator + LearnRateScheduler as documented (reference 5.5), driven like
    its loop: before each update at step s, ``step(s)`` may advance to the next pair; training ends when
    the pairs run out. Max steps bounds the loop. Returns the rate of every update from initial_step."""
    pairs = []
    for pair in text.split(","):
        if not pair.strip():
            continue
        rate, _, step = pair.partition(":")
        if step:
            step = int(step)
            if step > initial_step:
                pairs.append((float(rate), min(step, max_steps)))
                if step > max_steps:
                    break
            elif step == -1:
                pairs.append((float(rate), max_steps))
                break
        else:
            pairs.append((float(rate), max_steps))
            break
    if not pairs:  # the WebUI calls this schedule invalid; for us the run is simply already finished
        return []
    it = iter(pairs)
    rate, end = next(it)
    rates = []
    for s in range(initial_step, max_steps):
        if s >= end:
            try:
                rate, end = next(it)
            except StopIteration:
                break
        rates.append(rate)
    return rates


def our_rates(text: str, max_steps: int, initial_step: int = 0) -> list[float]:
    schedule = parse_schedule(text, max_steps)
    rates = []
    for s in range(initial_step, max_steps):
        value = schedule.value_at(s)
        if value is None:
            break
        rates.append(value)
    return rates


@pytest.mark.parametrize("text", ["0.005", "0.005:100, 1e-3:1000, 1e-5", "0.1:10, 0.01:-1", "0.1:10,0.2:20,",
                                  "5e-3:7, 1e-3:9", "0.1:1, 0.2:2, 0.3:3, 0.4", " 0.5 : 40 ,0.25:80 "])
@pytest.mark.parametrize("max_steps", [1, 5, 10, 50, 2000])
@pytest.mark.parametrize("initial_step", [0, 3, 9])
def test_rates_per_step_equal_the_webui_rules(text, max_steps, initial_step):
    assert our_rates(text, max_steps, initial_step) == webui_rates(text, max_steps, initial_step)


def test_example_from_the_docs():
    s = parse_schedule("0.005:100, 1e-3:1000, 1e-5", 5000)
    assert [s.value_at(i) for i in (0, 99, 100, 999, 1000, 4999, 5000)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5, None]
    assert s.end_step == 5000


def test_schedule_shorter_than_max_steps_ends_training_there():
    s = parse_schedule("0.1:10, 0.01:20", 1000)
    assert s.end_step == 20 and s.value_at(19) == 0.01 and s.value_at(20) is None


def test_steps_are_clamped_to_max_steps():
    s = parse_schedule("0.1:10, 0.01:2000, 0.001", 100)
    assert s.entries == ((0.1, 10), (0.01, 100))


def test_clip_schedule_keeps_its_last_value():
    s = parse_schedule("0.5:3, 0.1:6", 100)
    assert [s.value_or_last(i) for i in (0, 2, 3, 5, 6, 50)] == [0.5, 0.5, 0.1, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("text, named", [
    ("abc", "'abc'"),
    ("0.1:x", "'x'"),
    ("0.1:10, fast:20", "'fast'"),
    ("0.1:100, 0.2:50", "'0.2:50'"),
    ("0.1, 0.2:100", "'0.2:100'"),
    ("0.1:1:2", "'0.1:1:2'"),
    ("-0.1", "'-0.1'"),
    ("nan", "'nan'"),
    ("0.1:0", "'0.1:0'"),
    ("0.1:-5", "'0.1:-5'"),
    ("0.1:2.5", "'2.5'"),
    ("", "empty"),
    (" , ", "empty"),
    ("0.1, , 0.2", "'0.2'"),
    ("0.1:10, 0.2:20, oops", "'oops'"),  # checked even where max steps (10 here) makes it unused
])
def test_bad_schedules_name_the_bad_part(text, named):
    with pytest.raises(AlchemyError) as info:
        parse_schedule(text, 10 if "oops" in text else 1000)
    assert named in str(info.value) and "learn_rate" in str(info.value)


def test_error_names_the_option_it_parses():
    with pytest.raises(AlchemyError, match="clip_grad_value"):
        parse_schedule("x", 10, option="clip_grad_value")
