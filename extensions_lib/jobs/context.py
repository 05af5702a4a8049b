"""What the tab builders need from their host, in one object: the model, the folders, host hooks.

The WebUI glue fills it from ``shared`` (model getter over ``shared.sd_model``, the host's folders,
``on_files_changed`` reloading the host's embedding database); ``alchemy ui`` fills it from its command
line. Builders and jobs read only this, never a host module.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import AlchemyError


def _ignore(kind: str) -> None:
    return None


def _no_model():
    raise AlchemyError("no model is loaded", fix="load a Stable Diffusion checkpoint first")


@dataclass
class UIContext:
    """The host as the tabs see it.

    model: returns the loaded :class:`~extensions_lib.adapter.ModelAdapter`; raises AlchemyError naming
        the fix when there is none (or when it changed under a running job, for hosts that can tell).
    embeddings_dir / hypernetworks_dir: where created and trained files go (and are listed from).
    folders: other output folder kinds a registered method writes to ({kind: folder}; see :meth:`folder`).
    log_root: a relative "Log directory" of the train tabs is taken relative to this folder (the WebUI's
        data folder; runs are then logged in ``<log_root>/textual_inversion/<date>/<name>/``).
    tagger_models_dir: one sub-folder per tagger model (``models/tagger`` in the WebUI).
    cache_dir: where caches go (the tagger's score cache in ``<cache_dir>/tagger``); None: each tool's
        default (``~/.cache/alchemy/...``).
    templates_dir: extra prompt templates (the WebUI's ``textual_inversion_templates``), or None.
    preview_params: the WebUI's txt2img preview components ([prompt, negative_prompt, steps, sampler_name,
        cfg_scale, seed, width, height]) for "read preview parameters from txt2img"; None standalone.
    files_changed: called with "embeddings", "hypernetworks", "lora" or "checkpoints" after we wrote such a
        file, so the host can reload its own lists (the WebUI's embedding database does not notice a
        rewritten file).
    unsupported: tab key -> why that tab cannot work on this host; the tab then shows the reason.
    defaults: options class -> an instance whose values pre-fill that class's components (settings).
    """

    model: Callable[[], Any] = _no_model
    embeddings_dir: Path = Path("embeddings")
    hypernetworks_dir: Path = Path("models/hypernetworks")
    log_root: Path = Path(".")
    tagger_models_dir: Path = Path("models/tagger")
    cache_dir: Path | None = None
    templates_dir: Path | None = None
    preview_params: Sequence[Any] | None = None
    files_changed: Callable[[str], None] = _ignore
    folders: Mapping[str, Path] = field(default_factory=dict)
    unsupported: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[type, Any] = field(default_factory=dict)
    tagger_slot: Any = None
    """A :class:`extensions_lib.tagger.ModelSlot` kept between tagging jobs (made on first use)."""
    _slot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        for name in ("embeddings_dir", "hypernetworks_dir", "log_root", "tagger_models_dir"):
            setattr(self, name, Path(os.path.expanduser(os.fspath(getattr(self, name)))))
        for name in ("cache_dir", "templates_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(os.path.expanduser(os.fspath(getattr(self, name)))))

    def folder(self, kind: str) -> Path:
        """The output folder of a kind a method registers (``MethodSpec.folder``): "embeddings",
        "hypernetworks", or one given in ``folders``."""
        known = {"embeddings": self.embeddings_dir, "hypernetworks": self.hypernetworks_dir, **self.folders}
        if kind not in known:
            raise AlchemyError(f"this host has no {kind} folder", fix=f"give the UIContext folders={{{kind!r}: ...}}")
        return Path(os.path.expanduser(os.fspath(known[kind])))

    def defaults_for(self, cls) -> Any:
        """The pre-filled values for options class `cls` (its own defaults when the host gives none)."""
        value = self.defaults.get(cls)
        return value if value is not None else cls()

    def tagger(self):
        """The slot holding the loaded tagger (one at a time across jobs)."""
        with self._slot_lock:
            if self.tagger_slot is None:
                from ..tagger import ModelSlot

                self.tagger_slot = ModelSlot()
            return self.tagger_slot

    def resolve_log_directory(self, value: str) -> Path:
        """The train tabs' "Log directory" as a folder: absolute as given, else relative to ``log_root``."""
        path = Path(os.path.expanduser(value or "textual_inversion"))
        return path if path.is_absolute() else self.log_root / path

    def _templates(self) -> dict[str, Path]:
        """Template file name -> path: the shipped set (the WebUI's own files plus ``filewords``), then the
        host's ``textual_inversion_templates`` folder searched recursively as the WebUI does, which wins
        on a shared name (a user who edited the host's copy gets it)."""
        from importlib import resources

        found = {p.name: Path(str(p)) for p in resources.files("extensions_lib.train").joinpath("templates").iterdir()
                 if p.name.endswith(".txt")}
        if self.templates_dir is not None and self.templates_dir.is_dir():
            found.update({p.name: p for p in sorted(self.templates_dir.rglob("*.txt")) if p.is_file()})
        return found

    def template_choices(self) -> list[str]:
        """Prompt templates offered in the train tabs, by name (``style_filewords``, ``hypernetwork``, ...)."""
        return sorted(name[:-4] for name in self._templates())

    def resolve_template(self, value: str) -> str:
        """A template as the tabs and the API take it (a name from :meth:`template_choices` with or without
        ``.txt``, or a file path) -> the file to read; AlchemyError naming the choices when there is none."""
        value = str(value or "").strip()
        if not value:
            raise AlchemyError("no prompt template given", fix="pick one of: " + ", ".join(self.template_choices()))
        if Path(os.path.expanduser(value)).is_file():
            return os.path.expanduser(value)
        templates = self._templates()
        name = value if value.endswith(".txt") else f"{value}.txt"
        if Path(value).name == value and name in templates:
            return str(templates[name])
        raise AlchemyError("prompt template not found", value,
                           fix="give a .txt file path or one of: " + ", ".join(self.template_choices()))
