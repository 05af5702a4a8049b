"""Our section in the WebUI's Settings: hypernetwork toggle, folders, tagger defaults, training defaults.

Tagger and training defaults are not declared here: they are the option dataclasses
(:class:`~extensions_lib.tagger.options.CaptionOptions`/``TagRunOptions``, and the options every training
method shares, :class:`~extensions_lib.train.options.TrainingOptions`) rendered as settings, one key per UI
option, so the tabs, the CLI and the settings can never disagree on a default or a range.
:func:`all_defaults` turns the saved values back into the dataclasses the tabs pre-fill from (a value the
user broke falls back to the declared default, with the reason). Training logs go where the training
default "Log directory" says, relative to the WebUI's folder.

Setting values are what the WebUI can store in ``config.json``: list options are kept as comma-separated
text and "model default" (None) options as empty text.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import options as opt
from ..errors import AlchemyError

SECTION = ("alchemy", "Alchemy", "training")
HYPERNETWORK = "alchemy_hypernetwork"
HYPERNETWORK_STRENGTH = "alchemy_hypernetwork_strength"
NONE_CHOICE = "None"
INFOTEXT_NAME = "Hypernet"
INFOTEXT_STRENGTH = "Hypernet strength"
INFOTEXT_HASH = "Hypernet hash"
TAGGER_PREFIX = "alchemy_tagger_"
TRAIN_PREFIX = "alchemy_train_"
TAGGER_MODEL = "alchemy_tagger_model"
FOLDER_KEYS = {"embeddings": "alchemy_embeddings_dir", "hypernetworks": "alchemy_hypernetworks_dir",
               "tagger_models": "alchemy_tagger_models_dir"}


@dataclass(frozen=True)
class Setting:
    """One settings entry, host-agnostic; :func:`option_info` renders it for the WebUI."""

    key: str
    default: Any
    label: str
    widget: str = "textbox"  # textbox | textarea | checkbox | number | slider | dropdown
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    info: str = ""
    infotext: str | None = None
    refresh: Callable[[], None] | None = None


def hypernetwork_toggle(choices: Callable[[], Sequence[str]], refresh: Callable[[], None] | None = None) -> list[Setting]:
    """The hypernetwork select + strength, as the WebUI had them before extra networks (Oct-Dec 2022)."""
    return [
        Setting(HYPERNETWORK, NONE_CHOICE, "Hypernetwork", "dropdown", choices=lambda: [NONE_CHOICE, *choices()],
                info="applied to every txt2img/img2img generation; written to the infotext as 'Hypernet'",
                infotext=INFOTEXT_NAME, refresh=refresh),
        Setting(HYPERNETWORK_STRENGTH, 1.0, "Hypernetwork strength", "slider", minimum=0.0, maximum=1.0, step=0.001,
                info="0 turns it off; written to the infotext as 'Hypernet strength'", infotext=INFOTEXT_STRENGTH),
    ]


def folder_settings() -> list[Setting]:
    empty = "empty = the WebUI's own"
    return [
        Setting(FOLDER_KEYS["embeddings"], "", "Embeddings folder",
                info=f"where Alchemy lists, creates and saves embeddings ({empty}: --embeddings-dir); the WebUI "
                     "also loads embeddings from here"),
        Setting(FOLDER_KEYS["hypernetworks"], "", "Hypernetworks folder",
                info=f"where Alchemy lists, creates and saves hypernetworks ({empty}: --hypernetwork-dir)"),
        Setting(FOLDER_KEYS["tagger_models"], "", "Tagger models folder",
                info="one sub-folder per tagger model (model.onnx + selected_tags.csv, or a DeepDanbooru .pt); "
                     "empty = models/tagger"),
        Setting(TAGGER_MODEL, "", "Default tagger model", info="a folder name inside the tagger models folder"),
    ]


def _stored(spec: opt.OptionSpec, value: Any) -> Any:
    """A declared default as the WebUI stores it."""
    if spec.multiple:
        return ", ".join(map(str, value or []))
    if value is None:
        return ""
    if isinstance(value, Path):
        return str(value)
    return getattr(value, "value", value)


def spec_setting(spec: opt.OptionSpec, key: str, label_prefix: str = "") -> Setting:
    """The setting holding the default of one declared option."""
    widget = spec.widget
    if spec.multiple or (spec.default is None and widget == "number"):
        widget = "textbox"  # lists as comma-separated text; "model default" as empty text
    return Setting(key, _stored(spec, spec.default), label_prefix + spec.label, widget, choices=spec.choices,
                   minimum=spec.minimum, maximum=spec.maximum, step=spec.step,
                   info=spec.help + (" (comma-separated)" if spec.multiple else "")
                   + (" (empty = the model's default)" if spec.default is None else ""))


def tagger_keys() -> dict[type, dict[str, str]]:
    """{options class: {option: setting key}} for the tagger defaults (caption rules and run options)."""
    from ..tagger.options import CaptionOptions, TagRunOptions

    keys = {cls: {s.name: TAGGER_PREFIX + s.name for s in opt.specs(cls) if s.ui}
            for cls in (CaptionOptions, TagRunOptions)}
    clash = set(keys[CaptionOptions]) & set(keys[TagRunOptions])
    if clash:
        raise RuntimeError(f"tagger option names used twice: {sorted(clash)}")
    return keys


PER_METHOD_OPTIONS = frozenset({"learn_rate"})
"""Shared training options whose default depends on the method: each method saves its own
(hypernetworks want a learning rate 500 times smaller than embeddings)."""


def training_methods() -> dict[str, type]:
    """{method key: training options class} of every registered method
    (:mod:`extensions_lib.methods.registry`)."""
    from ..methods.registry import methods

    return {m.key: m.train_options for m in methods()}


def training_keys(methods: dict[str, type] | None = None) -> dict[type, dict[str, str]]:
    """{method options class: {option: setting key}} for the options every method shares.

    One key (``alchemy_train_<option>``) shared by the methods, except where a method's good default differs:
    then it has its own (``alchemy_train_<method>_<option>``), so one method's saved value never reaches
    another. Own keys are the :data:`PER_METHOD_OPTIONS`, and any option a method declares with another
    default than the methods registered before it. Keys depend only on the methods up to that one in
    registry order, so registering a new method never renames the others' keys (saved settings stay).
    """
    from ..train.options import TrainingOptions

    methods = methods or training_methods()
    shared_default: dict[str, str] = {}  # option -> repr of the default its shared key holds
    keys: dict[type, dict[str, str]] = {}
    for method, cls in methods.items():
        declared = {s.name: s for s in opt.specs(cls)}
        keys[cls] = {}
        for spec in opt.specs(TrainingOptions):
            if not spec.ui:
                continue
            default = shared_default.setdefault(spec.name, repr(declared[spec.name].default))
            own = spec.name in PER_METHOD_OPTIONS or repr(declared[spec.name].default) != default
            keys[cls][spec.name] = TRAIN_PREFIX + (f"{method}_{spec.name}" if own else spec.name)
    return keys


def keyed_settings(keys: dict[type, dict[str, str]], labels: dict[type, str] | None = None) -> list[Setting]:
    """One setting per distinct key of `keys`, in declaration order."""
    out: dict[str, Setting] = {}
    shared = {key for key in set().union(*(k.values() for k in keys.values()))
              if sum(key in k.values() for k in keys.values()) > 1}
    for cls, mapping in keys.items():
        by_name = {s.name: s for s in opt.specs(cls)}
        for name, key in mapping.items():
            if key not in out:
                prefix = "" if key in shared or not labels else labels.get(cls, "")
                out[key] = spec_setting(by_name[name], key, prefix)
    return list(out.values())


def all_settings(hypernetwork_choices: Callable[[], Sequence[str]],
                 refresh_hypernetworks: Callable[[], None] | None = None) -> list[Setting]:
    from ..methods.registry import methods

    labels = {m.train_options: f"{m.title}: " for m in methods()}
    return [*hypernetwork_toggle(hypernetwork_choices, refresh_hypernetworks), *folder_settings(),
            *keyed_settings(tagger_keys()), *keyed_settings(training_keys(), labels)]


# ---- rendering for the WebUI ------------------------------------------------------------------------

def option_info(shared, setting: Setting, gr=None):
    """The ``shared.OptionInfo`` of `setting` (component and arguments for gradio 3.41)."""
    if gr is None:
        import gradio as gr
    component, args = None, None
    if setting.widget == "dropdown":
        component = gr.Dropdown
        choices = setting.choices
        args = (lambda: {"choices": list(choices())}) if callable(choices) else {"choices": list(choices or [])}
    elif setting.widget == "slider":
        component = gr.Slider
        args = {"minimum": setting.minimum, "maximum": setting.maximum, "step": setting.step or 1}
    elif setting.widget == "textarea":
        component, args = gr.Textbox, {"lines": 3}
    elif setting.widget == "number":
        component = gr.Number
        if setting.minimum is not None or setting.maximum is not None:
            args = {k: v for k, v in (("minimum", setting.minimum), ("maximum", setting.maximum)) if v is not None}
    elif setting.widget == "checkbox":
        component = gr.Checkbox
    kwargs = dict(component=component, component_args=args, section=SECTION[:2], refresh=setting.refresh)
    if setting.infotext:
        kwargs["infotext"] = setting.infotext
    try:
        info = shared.OptionInfo(setting.default, setting.label, **kwargs)
    except TypeError:  # hosts older than 1.6 know neither infotext= nor category_id
        kwargs.pop("infotext", None)
        info = shared.OptionInfo(setting.default, setting.label, **kwargs)
    if len(SECTION) == 3:
        info.category_id = SECTION[2]
    if setting.info and hasattr(info, "info"):
        info = info.info(setting.info)
    return info


def register(shared, settings: Sequence[Setting], gr=None) -> None:
    """Add `settings` to the host's options (call from ``on_ui_settings``)."""
    for setting in settings:
        shared.opts.add_option(setting.key, option_info(shared, setting, gr))


# ---- reading back -----------------------------------------------------------------------------------

def read(opts, key: str, default: Any = None) -> Any:
    """A setting's value; `default` when the host has none (API-only mode registers no settings)."""
    try:
        value = getattr(opts, key)
    except (AttributeError, KeyError):
        return default
    return default if value is None and default is not None else value


def read_defaults(opts, cls, keys: dict[str, str], base: Any = None) -> tuple[Any, list[str]]:
    """(`cls` with the saved settings of `keys` ({option: setting key}) over `base`'s (or the declared)
    values, [why a saved value was ignored, ...])."""
    by_name = {s.name: s for s in opt.specs(cls)}
    values = opt.to_dict(base) if base is not None else {}
    problems: list[str] = []
    for name, key in keys.items():
        spec = by_name[name]
        raw = read(opts, key, None)
        if raw is None:
            continue
        if spec.default is None and raw == "":
            values[name] = None
            continue
        try:
            opt.from_dict(cls, {**values, name: raw}, source=f"setting {key}")
        except AlchemyError as exc:
            problems.append(f"{exc.message}; using {spec.default!r}")
            continue
        values[name] = raw
    return opt.from_dict(cls, values, source="settings"), problems


def all_defaults(opts) -> tuple[dict[type, Any], list[str]]:
    """{options class: defaults from the settings} for the tagger and training classes, and problems."""
    from ..tagger.options import TagRunOptions

    out: dict[type, Any] = {}
    problems: list[str] = []
    for keys in (tagger_keys(), training_keys()):
        for cls, mapping in keys.items():
            base = cls(model=str(read(opts, TAGGER_MODEL, "") or "")) if cls is TagRunOptions else None
            out[cls], found = read_defaults(opts, cls, mapping, base)
            problems += found
    return out, problems


@dataclass(frozen=True)
class Folders:
    embeddings: Path
    hypernetworks: Path
    tagger_models: Path

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def resolve_folders(opts, *, embeddings: str | os.PathLike, hypernetworks: str | os.PathLike,
                    models: str | os.PathLike, data: str | os.PathLike) -> Folders:
    """Our folders: each setting, or the host's equivalent when it is empty. Relative paths are taken
    from the WebUI's data folder, as the host does for its own."""

    def pick(key: str, fallback: str | os.PathLike) -> Path:
        value = str(read(opts, key, "") or "").strip()
        path = Path(os.path.expanduser(value)) if value else Path(fallback)
        return path if path.is_absolute() else Path(data) / path

    return Folders(embeddings=pick(FOLDER_KEYS["embeddings"], embeddings),
                   hypernetworks=pick(FOLDER_KEYS["hypernetworks"], hypernetworks),
                   tagger_models=pick(FOLDER_KEYS["tagger_models"], Path(models) / "tagger"))


def hypernetwork_choice(opts) -> tuple[str | None, float]:
    """(chosen hypernetwork or None, strength) from the toggle."""
    name = read(opts, HYPERNETWORK, NONE_CHOICE) or NONE_CHOICE
    try:
        strength = float(read(opts, HYPERNETWORK_STRENGTH, 1.0))
    except (TypeError, ValueError):
        strength = 1.0
    return (None if name == NONE_CHOICE else str(name)), strength
