"""Options are declared once, as typed dataclasses, and rendered from there.

A method's options class is a plain ``@dataclass`` whose fields are made with :func:`option`. The same
declaration becomes CLI flags (:func:`add_cli_arguments` / :func:`from_cli`), gradio components
(:func:`gradio_components` / :func:`from_ui_values`) and the saved training-settings JSON
(:func:`to_dict` / :func:`from_dict`), so the three can never drift apart.

Example::

    @dataclass
    class TrainOptions:
        learn_rate: str = option("0.005", help="learning-rate schedule, e.g. '0.005:100, 1e-3'")
        steps: int = option(100000, help="stop after this many steps", minimum=1)
        shuffle_tags: bool = option(False, help="shuffle comma-separated caption tags")
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any, Sequence

from .errors import AlchemyError

_META = "alchemy"


def option(default: Any, *, help: str, label: str | None = None, choices: Sequence[Any] | None = None,
           minimum: float | None = None, maximum: float | None = None, step: float | None = None,
           cli: str | None = None, widget: str | None = None, group: str = "", ui: bool = True,
           multiple: bool = False) -> Any:
    """Declare one user-facing option.

    help: one sentence shown as CLI help and UI info. label: UI label (default: derived from name).
    choices: allowed values (dropdown / argparse choices). minimum/maximum/step: numeric bounds (slider
    when both bounds are given). cli: flag name override. widget: force a gradio widget
    ("textbox", "textarea", "number", "slider", "checkbox", "dropdown", "radio"). group: heading in the
    UI. ui: False keeps an option CLI/JSON-only (e.g. paths chosen elsewhere in a tab).
    multiple: a list option (repeatable CLI flag, multiselect dropdown).
    """
    meta = dict(help=help, label=label, choices=list(choices) if choices is not None else None,
                minimum=minimum, maximum=maximum, step=step, cli=cli, widget=widget, group=group,
                ui=ui, multiple=multiple)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any
    default: Any
    help: str
    label: str
    choices: list | None
    minimum: float | None
    maximum: float | None
    step: float | None
    cli: str
    widget: str
    group: str
    ui: bool
    multiple: bool


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return _base_type(args[0]) if args else str
    return tp


def specs(cls) -> list[OptionSpec]:
    """The declared options of a dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = meta["choices"]
        if choices is None and isinstance(tp, type) and issubclass(tp, enum.Enum):
            choices = [m.value for m in tp]
        widget = meta["widget"]
        if widget is None:
            if tp is bool:
                widget = "checkbox"
            elif choices is not None:
                widget = "dropdown"
            elif tp in (int, float) and meta["minimum"] is not None and meta["maximum"] is not None:
                widget = "slider"
            elif tp in (int, float):
                widget = "number"
            else:
                widget = "textbox"
        out.append(OptionSpec(
            name=f.name, type=tp, default=default, help=meta["help"],
            label=meta["label"] or f.name.replace("_", " ").capitalize(), choices=choices,
            minimum=meta["minimum"], maximum=meta["maximum"], step=meta["step"],
            cli=meta["cli"] or "--" + f.name.replace("_", "-"), widget=widget, group=meta["group"],
            ui=meta["ui"], multiple=meta["multiple"]))
    return out


def _coerce(spec: OptionSpec, value: Any, source: str) -> Any:
    """Convert a raw value (CLI string, JSON value, UI value) to the declared type, or explain."""
    if spec.multiple:
        if value is None:
            return []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [_coerce(dataclasses.replace(spec, multiple=False), v, source) for v in value]
    tp = spec.type
    try:
        if value is None:
            return None
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            value = int(value)
        elif tp is float:
            value = float(value)
        elif tp is Path:
            value = Path(value)
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            value = tp(value)
        elif tp is str:
            value = str(value)
    except (TypeError, ValueError):
        raise AlchemyError(f"option {spec.name} ({source}) expects {getattr(tp, '__name__', tp)}, got {value!r}",
                           fix=spec.help) from None
    if spec.choices is not None:
        raw = value.value if isinstance(value, enum.Enum) else value
        if raw not in spec.choices:
            raise AlchemyError(f"option {spec.name} ({source}) must be one of {spec.choices}, got {raw!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise AlchemyError(f"option {spec.name} ({source}) must be >= {spec.minimum}, got {value}")
        if spec.maximum is not None and value > spec.maximum:
            raise AlchemyError(f"option {spec.name} ({source}) must be <= {spec.maximum}, got {value}")
    return value


# ---- CLI -------------------------------------------------------------------------------------------

def add_cli_arguments(parser: argparse.ArgumentParser, cls, *, skip: Sequence[str] = ()) -> None:
    """Add one flag per option of `cls` to `parser` (defaults shown in --help)."""
    for spec in specs(cls):
        if spec.name in skip:
            continue
        help_text = spec.help
        if spec.choices is not None:
            help_text += f" (one of: {', '.join(map(str, spec.choices))})"
        if spec.default not in (None, "", []):
            shown = spec.default.value if isinstance(spec.default, enum.Enum) else spec.default
            help_text += f" [default: {shown}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help ("30% slower" would pull in its dict)
        dest = spec.name
        if spec.type is bool and not spec.multiple:
            parser.add_argument(spec.cli, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif spec.multiple:
            parser.add_argument(spec.cli, dest=dest, action="append", default=None, help=help_text)
        else:
            parser.add_argument(spec.cli, dest=dest, default=None, help=help_text,
                                metavar=spec.name.upper())


def from_cli(cls, namespace: argparse.Namespace, base: Any = None):
    """Build `cls` from parsed flags; flags not given keep the value of `base` (or the default)."""
    values = to_dict(base) if base is not None else {}
    for spec in specs(cls):
        raw = getattr(namespace, spec.name, None)
        if raw is not None:
            values[spec.name] = raw
    return from_dict(cls, values, source="command line")


# ---- JSON (saved settings) -------------------------------------------------------------------------

def to_dict(obj) -> dict:
    """JSON-ready dict of every declared option (enums as values, paths as strings)."""
    out = {}
    for spec in specs(type(obj)):
        value = getattr(obj, spec.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [v.value if isinstance(v, enum.Enum) else str(v) if isinstance(v, Path) else v for v in value]
        out[spec.name] = value
    return out


def from_dict(cls, values: dict, *, source: str = "settings", strict: bool = False):
    """Build `cls` from a dict; unknown keys are an error only when `strict` (older files may carry more)."""
    known = {s.name: s for s in specs(cls)}
    unknown = set(values) - set(known)
    if strict and unknown:
        raise AlchemyError(f"unknown option(s) in {source}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, spec in known.items():
        if name in values:
            kwargs[name] = _coerce(spec, values[name], source)
    return cls(**kwargs)


# ---- gradio ----------------------------------------------------------------------------------------

def gradio_components(cls, defaults: Any = None, *, elem_prefix: str = "alchemy",
                      only: Sequence[str] | None = None) -> dict[str, Any]:
    """Create one gradio (3.x) component per UI option, in declaration order, inside the current Blocks.

    only: render just these options (a tab may lay out one class's options in several places).
    Returns {option name: component}; pass the components' values back through :func:`from_ui_values`.
    """
    import gradio as gr  # imported here: the core must import without gradio

    base = to_dict(defaults) if defaults is not None else {}
    keep = None if only is None else set(only)
    comps: dict[str, Any] = {}
    for spec in specs(cls):
        if not spec.ui or (keep is not None and spec.name not in keep):
            continue
        value = base.get(spec.name, spec.default)
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, Path):
            value = str(value)
        kw = dict(label=spec.label, info=spec.help, elem_id=f"{elem_prefix}_{spec.name}")
        if spec.widget == "checkbox":
            comp = gr.Checkbox(value=bool(value), **kw)
        elif spec.widget in ("dropdown", "radio"):
            maker = gr.Radio if spec.widget == "radio" else gr.Dropdown
            extra = {"multiselect": True} if spec.multiple and maker is gr.Dropdown else {}
            comp = maker(choices=list(spec.choices or []), value=value, **extra, **kw)
        elif spec.widget == "slider" and spec.default is not None:
            comp = gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step or (1 if spec.type is int else 0.01),
                             value=value, **kw)
        elif spec.widget == "number" and spec.default is not None:
            comp = gr.Number(value=value, precision=0 if spec.type is int else None, **kw)
        else:
            # Also numbers whose default is None ("empty = automatic"): gradio 3.41's Number shows and
            # sends 0 for an empty value, which would silently turn "automatic" into 0.
            if spec.multiple and isinstance(value, list):
                value = ", ".join(map(str, value))
            lines = 3 if spec.widget == "textarea" else 1
            comp = gr.Textbox(value="" if value is None else str(value), lines=lines, **kw)
        comps[spec.name] = comp
    return comps


def from_ui_values(cls, names: Sequence[str], values: Sequence[Any], base: Any = None):
    """Build `cls` from component values given in the order of `names` (as gradio passes them)."""
    merged = to_dict(base) if base is not None else {}
    optional = {s.name for s in specs(cls) if s.default is None}
    for name, value in zip(names, values):
        if isinstance(value, str) and value.strip() == "" and name in optional:
            value = None  # an emptied box means "automatic", not an empty string
        merged[name] = value
    return from_dict(cls, merged, source="UI")
