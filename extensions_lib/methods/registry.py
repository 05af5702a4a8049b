"""The training-method registry: every training method declares itself here once, and the CLI, the training
tabs, the saved settings and the HTTP API are generated from it.

How a method registers
======================
A method is one package (``extensions_lib/<method>/``) plus ONE line in :data:`METHOD_MODULES` below: the
dotted name of a module of that package holding ``METHOD = MethodSpec(...)`` (by convention
``extensions_lib/<method>/registration.py``). Keep that module light: it imports the options classes
(dataclasses, see :mod:`extensions_lib.options`) and names everything heavy as a ``"module:attribute"``
string, imported only when used (the CLI, for one, must not import gradio).

A :class:`MethodSpec` provides:

- ``key``: short lowercase name, e.g. ``"embedding"``. It becomes the CLI command (``alchemy embedding ...``),
  the API route (``POST /alchemy/v1/train/embedding``), the tab keys and element ids (``train_embedding``,
  ``create_embedding``; tabs ``alchemy_train_embedding_tab``), and per-method settings keys
  (``alchemy_train_embedding_<option>``).
- ``title``: human title, capitalised (``"Embedding"``): the settings label prefix (``"Embedding: Learning
  rate"``).
- ``noun``: what is trained, lower case (``"embedding"``): tab titles "Create embedding" / "Train embedding",
  buttons and job titles ("Training embedding NAME").
- ``train_options``: the training options dataclass. It should subclass
  :class:`~extensions_lib.train.options.TrainingOptions` (the options every method shares). Their defaults are
  saved in Settings, one shared key ``alchemy_train_<option>`` per option; where a method declares another
  default than the methods registered before it (or for ``learn_rate``) it gets its own key
  ``alchemy_train_<key>_<option>`` (:func:`extensions_lib.host.settings.training_keys`).
- ``name_option``: the option of ``train_options`` that names the file to train (``"embedding_name"``); the
  train tab renders it as a dropdown of the folder's files and the API requires it.
- ``folder``: the output folder kind: ``"embeddings"`` or ``"hypernetworks"`` (``context.folder(kind)``
  returns the host's folder). The job writes there (see ``folder_option``) and calls
  ``context.files_changed(folder)`` after writing, so the WebUI reloads its list. A new kind must also be
  given to :class:`~extensions_lib.jobs.context.UIContext` in ``folders`` by the WebUI glue
  (``host/extension.py``: ``context()``, ``files_changed()``) and by ``alchemy ui`` (``ui/app.py``).
- ``folder_option``: the option of ``train_options`` (and ``create_options``) holding that folder
  (``"embeddings_dir"``); jobs fill it from the host's folder. None: the method has no such option.
- ``train_job``: ``"module:function"``, ``function(TrainRequest, JobContext) -> TrainResult`` (see
  :mod:`extensions_lib.jobs.training`); runs the training for the tab and the API.
- ``train_tab``: ``"module:function"``, ``function(runner, context, method)`` renders the train sub-tab's
  contents into the open gradio block (usually a few lines over
  :func:`extensions_lib.ui.train_tab.build_train_tab`; ``method`` is this spec).
- ``cli``: dotted name of the command module: ``register(subparsers)`` adds the ``alchemy <key>`` command
  (usually with ``create``/``train`` actions, see :mod:`extensions_lib.commands.method_commands`).
- optional ``create_options`` + ``create_job``: the "Create ..." sub-tab. ``create_job``: ``"module:function"``,
  ``function(CreateRequest, JobContext | None) -> Path`` (see :mod:`extensions_lib.jobs.training`), writes the
  new file into the method's folder. ``create_needs_model``: creating reads the model (it then runs as a job
  on the runner, and hosts without a model mark the tab unsupported); otherwise it runs in the click handler
  with ``job=None``. ``create_tab``: like ``train_tab``; the default,
  :func:`extensions_lib.ui.create_tab.build_create_tab`, renders ``create_options`` with a button.

Tabs are built in registry order: every method's "Create" tab, then every "Train" tab. Settings, CLI
commands and API routes follow registry order too.

Example (a method "toy" training a file in the embeddings folder)::

    # extensions_lib/toy/registration.py
    from ..methods.registry import MethodSpec
    from .options import ToyTrainOptions          # a TrainingOptions subclass with toy_name, embeddings_dir

    METHOD = MethodSpec(
        key="toy", title="Toy", noun="toy embedding",
        train_options=ToyTrainOptions, name_option="toy_name",
        folder="embeddings", folder_option="embeddings_dir",
        train_job="extensions_lib.toy.job:train_toy_file",
        train_tab="extensions_lib.toy.tab:build_train_toy",
        cli="extensions_lib.toy.commands",
    )

    # and in METHOD_MODULES below:
    #     "extensions_lib.toy.registration",

``tests/toy_method.py`` is a complete, tested example.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Union

from ..errors import AlchemyError

METHOD_MODULES: tuple[str, ...] = (
    "extensions_lib.embeddings.registration",     # textual inversion
    "extensions_lib.hypernetworks.registration",  # hypernetworks
)
"""Every training method, in the order the CLI, the tabs, the settings and the API list them."""

Ref = Union[str, Callable[..., Any]]
"""A function given directly, or as ``"package.module:attribute"`` (imported when first used)."""


def resolve(ref: Ref) -> Callable[..., Any]:
    """The function `ref` names."""
    if not isinstance(ref, str):
        return ref
    module, sep, attribute = ref.partition(":")
    if not sep:
        raise ValueError(f"{ref!r} is not 'package.module:attribute'")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class MethodSpec:
    """One training method as the registry knows it (fields described in the module docstring)."""

    key: str
    title: str
    noun: str
    train_options: type
    name_option: str
    folder: str
    train_job: Ref
    train_tab: Ref
    cli: str
    folder_option: str | None = None
    create_options: type | None = None
    create_job: Ref | None = None
    create_tab: Ref = "extensions_lib.ui.create_tab:build_create_tab"
    create_needs_model: bool = False

    def __post_init__(self):
        if not self.key.isidentifier() or self.key != self.key.lower():
            raise ValueError(f"method key {self.key!r} must be a lowercase identifier")
        fields = getattr(self.train_options, "__dataclass_fields__", {})
        for name in (self.name_option, self.folder_option):
            if name is not None and name not in fields:
                raise ValueError(f"method {self.key}: {self.train_options.__name__} has no option {name!r}")
        if (self.create_options is None) != (self.create_job is None):
            raise ValueError(f"method {self.key}: create_options and create_job go together")

    @property
    def train_panel(self) -> str:
        """Tab key / element-id stem of the train sub-tab (``context.unsupported`` uses it too)."""
        return f"train_{self.key}"

    @property
    def create_panel(self) -> str | None:
        return f"create_{self.key}" if self.create_options is not None else None

    def model_panels(self) -> list[str]:
        """The tab keys that need the loaded model."""
        return [self.create_panel] * self.create_needs_model + [self.train_panel]


def methods() -> list[MethodSpec]:
    """Every registered method, in :data:`METHOD_MODULES` order."""
    out: list[MethodSpec] = []
    for name in METHOD_MODULES:
        spec = importlib.import_module(name).METHOD
        if any(m.key == spec.key for m in out):
            raise ValueError(f"two training methods use the key {spec.key!r} ({name})")
        out.append(spec)
    return out


def find(key: str) -> MethodSpec:
    """The method registered as `key`; AlchemyError listing the known keys when there is none."""
    known = methods()
    for spec in known:
        if spec.key == key:
            return spec
    raise AlchemyError(f"unknown training method {key!r}", fix=f"use one of: {', '.join(m.key for m in known)}")


def for_options(cls: type) -> MethodSpec | None:
    """The method whose train or create options class is `cls`."""
    return next((m for m in methods() if cls in (m.train_options, m.create_options)), None)
