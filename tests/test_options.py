"""One declaration renders to CLI flags, saved JSON and gradio components that agree with each other."""
from __future__ import annotations

import argparse
import enum
import json
from dataclasses import dataclass
from typing import Optional

import pytest

from extensions_lib.errors import AlchemyError
from extensions_lib.options import (add_cli_arguments, from_cli, from_dict, from_ui_values, gradio_components,
                                    option, specs, to_dict)


class Mode(enum.Enum):
    ONCE = "once"
    RANDOM = "random"




@dataclass
class Opts:
    learn_rate: str = option("0.005", help="schedule")
    steps: int = option(100, help="max steps", minimum=1)
    scale: float = option(1.0, help="strength", minimum=0.0, maximum=2.0)
    shuffle: bool = option(False, help="shuffle tags")
    mode: Mode = option(Mode.ONCE, help="latent sampling")
    tags: list[str] = option([], help="always-first tags", multiple=True)
    hidden: str = option("x", help="not in UI", ui=False)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser, Opts)
    return from_cli(Opts, parser.parse_args(argv))


def test_cli_defaults_equal_dataclass_defaults():
    assert parse([]) == Opts()


def test_cli_values_are_typed_and_validated():
    o = parse(["--steps", "7", "--scale", "1.5", "--shuffle", "--mode", "random", "--tags", "a", "--tags", "b"])
    assert (o.steps, o.scale, o.shuffle, o.mode, o.tags) == (7, 1.5, True, Mode.RANDOM, ["a", "b"])
    with pytest.raises(AlchemyError, match="steps"):
        parse(["--steps", "0"])
    with pytest.raises(AlchemyError, match="scale"):
        parse(["--scale", "3"])
    with pytest.raises(AlchemyError, match="mode"):
        parse(["--mode", "sometimes"])
    with pytest.raises(AlchemyError, match="steps"):
        parse(["--steps", "ten"])


def test_json_round_trip_is_exact():
    o = Opts(steps=3, scale=0.25, shuffle=True, mode=Mode.RANDOM, tags=["x", "y"])
    text = json.dumps(to_dict(o))
    assert from_dict(Opts, json.loads(text)) == o


def test_cli_overrides_saved_settings_only_where_given():
    saved = Opts(steps=3, shuffle=True)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser, Opts)
    o = from_cli(Opts, parser.parse_args(["--scale", "0.5"]), base=saved)
    assert (o.steps, o.shuffle, o.scale) == (3, True, 0.5)


def test_unknown_keys_tolerated_unless_strict():
    assert from_dict(Opts, {"steps": 2, "future_option": 1}).steps == 2
    with pytest.raises(AlchemyError, match="future_option"):
        from_dict(Opts, {"future_option": 1}, strict=True)


def test_specs_pick_widgets():
    widgets = {s.name: s.widget for s in specs(Opts)}
    assert widgets == {"learn_rate": "textbox", "steps": "number", "scale": "slider", "shuffle": "checkbox",
                       "mode": "dropdown", "tags": "textbox", "hidden": "textbox"}


@pytest.mark.needs_gradio
def test_gradio_components_round_trip():
    gr = pytest.importorskip("gradio")
    with gr.Blocks(analytics_enabled=False):
        comps = gradio_components(Opts, Opts(steps=9))
    assert "hidden" not in comps
    assert comps["steps"].value == 9
    assert comps["mode"].choices in (["once", "random"], [("once", "once"), ("random", "random")])
    names = list(comps)
    values = [c.value for c in comps.values()]
    assert from_ui_values(Opts, names, values) == Opts(steps=9)


@dataclass
class Thresholds:
    threshold: Optional[float] = option(None, help="empty = the model's default", minimum=0.0, maximum=1.0)
    count: int = option(3, help="how many")


@pytest.mark.needs_gradio
def test_empty_number_stays_none_through_the_ui():
    gr = pytest.importorskip("gradio")
    with gr.Blocks(analytics_enabled=False):
        comps = gradio_components(Thresholds)
    # gradio 3.41's Number turns an empty value into 0; an "empty = automatic" option must not.
    assert isinstance(comps["threshold"], gr.Textbox) and isinstance(comps["count"], gr.Number)
    assert from_ui_values(Thresholds, ["threshold", "count"], ["", 3]).threshold is None
    assert from_ui_values(Thresholds, ["threshold", "count"], ["0.5", 3]).threshold == 0.5


@pytest.mark.needs_gradio
def test_only_renders_the_named_options():
    gr = pytest.importorskip("gradio")
    with gr.Blocks(analytics_enabled=False):
        comps = gradio_components(Opts, only=["steps", "mode"])
    assert list(comps) == ["steps", "mode"]


def test_help_text_with_a_percent_sign_shows_as_written():
    """argparse %-formats help strings: "30% slower" must print as is, not pull in argparse's own dict."""
    from extensions_lib.options import option

    @dataclass
    class WithPercent:
        fast: bool = option(False, help="about 30% slower, 100%% sure")

    parser = argparse.ArgumentParser(prog="x")
    add_cli_arguments(parser, WithPercent)
    text = " ".join(parser.format_help().split())
    assert "about 30% slower, 100%% sure [default: False]" in text and "option_strings" not in text


def test_every_commands_help_renders_cleanly(capsys):
    """Each subcommand's --help (generated from the option declarations) prints without argparse internals."""
    from extensions_lib.cli import build_parser

    parser, problems = build_parser()
    assert problems == []
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    seen = 0
    stack = list(subparsers)
    while stack:
        for name, sub in stack.pop().choices.items():
            text = sub.format_help()
            assert "option_strings" not in text, name
            seen += 1
            stack += [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
    assert seen > 10
