"""Alchemy as a WebUI extension: what each host callback does, given the host modules the glue found.

``scripts/alchemy.py`` makes one :class:`AlchemyExtension` and registers its methods with the host's
callbacks; nothing here imports a host module. Every callback is fail-soft: an error in our code is
logged and shown in our own tab, never raised into the WebUI's start-up.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from ..errors import AlchemyError
from ..library_cache import LibraryCache
from . import settings as st
from .handles import HostHandles
from .aesthetic import AestheticWiring
from .jobs import HostJobRunner
from .webui_adapter import ModelWatch
from .wiring import EmbeddingWiring, HypernetworkWiring

log = logging.getLogger("alchemy")

TAB_TITLE = "Alchemy"
TAB_ID = "alchemy"
TRAIN_TAB_PREFIX = "Alchemy: "
STOP_ON_UNLOAD_S = 30.0
WITHOUT_CALLBACK = {
    "on_app_started": "no live progress while a job runs and no HTTP API (each tab still shows how its job ended)",
    "on_script_unloaded": "Reload UI cannot take the hypernetwork toggle's patch off the model (restart the WebUI "
                          "after turning the toggle off)",
    "on_ui_settings": "no Alchemy section in Settings (the declared defaults apply)",
}
"""What the user loses when the host lacks a callback (``on_model_loaded`` is covered by the checks at use)."""


class AlchemyExtension:
    def __init__(self, handles: HostHandles):
        self.h = handles
        self.watch = ModelWatch(handles.current_model, handles.device)
        self.runner = HostJobRunner(state=getattr(handles.shared, "state", None),
                                    gpu_call=getattr(handles.call_queue, "wrap_gradio_gpu_call", None),
                                    watch=self.watch, on_model_use=self._job_takes_model)
        self.embeddings = EmbeddingWiring(handles.embedding_db, handles.model_loaded)
        self.hypernetworks = HypernetworkWiring(handles.shared, self.hypernetwork_library, self.watch.adapter,
                                                handles.has_hypernetwork_path())
        self.aesthetic = AestheticWiring(lambda: self.h.models_path() / "aesthetic_embeddings",
                                         lambda: self.h.models_path() / "aesthetic_clip", lambda: self.opts,
                                         self.watch.token)
        self._hn_libraries = LibraryCache(_hypernetwork_library)
        self._tagger_slot = None
        self.problems: list[str] = []
        """Things the user should know (settings that were ignored, host parts missing), shown in our tab."""

    # --- folders, libraries, the tabs' context ---------------------------------------------------------
    @property
    def opts(self) -> Any:
        return getattr(self.h.shared, "opts", None)

    def folders(self) -> st.Folders:
        return st.resolve_folders(self.opts, embeddings=self.h.embeddings_dir(), hypernetworks=self.h.hypernetwork_dir(),
                                  models=self.h.models_path(), data=self.h.data_path())

    def hypernetwork_library(self):
        return self._hn_libraries.get(self.folders().hypernetworks)

    def context(self, preview_params=None):
        """The :class:`~extensions_lib.jobs.context.UIContext` the tabs and the API work with, from the
        current settings."""
        from ..tagger import ModelSlot
        from ..jobs.context import UIContext

        folders = self.folders()
        defaults, problems = st.all_defaults(self.opts)
        for problem in problems:
            if problem not in self.problems:
                log.warning("Alchemy: %s", problem)
                self.problems.append(problem)
        if self._tagger_slot is None:
            self._tagger_slot = ModelSlot()
        return UIContext(model=self.watch.adapter, embeddings_dir=folders.embeddings,
                         hypernetworks_dir=folders.hypernetworks, log_root=self.h.data_path(),
                         tagger_models_dir=folders.tagger_models, templates_dir=self.h.templates_dir(),
                         preview_params=preview_params, files_changed=self.files_changed,
                         unsupported=self.h.unsupported(), defaults=defaults, tagger_slot=self._tagger_slot,
                         folders={"lora": self.lora_dir(), "checkpoints": self.checkpoints_dir(),
                                  "aesthetic_embeddings": self.h.models_path() / "aesthetic_embeddings",
                                  "aesthetic_clip": self.h.models_path() / "aesthetic_clip"})

    def lora_dir(self) -> Path:
        """The built-in Lora extension's folder: ``--lora-dir``, by default ``<models>/Lora``."""
        cmd_opts = getattr(self.h.shared, "cmd_opts", None)
        return Path(getattr(cmd_opts, "lora_dir", None) or Path(self.h.models_path()) / "Lora")

    def checkpoints_dir(self) -> Path:
        """Where a trained checkpoint goes so the host lists it: ``--ckpt-dir`` when given, else its
        ``sd_models.model_path`` (``<models>/Stable-diffusion``)."""
        cmd_opts = getattr(self.h.shared, "cmd_opts", None)
        value = getattr(cmd_opts, "ckpt_dir", None) or getattr(self.h.sd_models, "model_path", None)
        return Path(value) if value else Path(self.h.models_path()) / "Stable-diffusion"

    def files_changed(self, kind: str) -> None:
        """After a job wrote a file: make the host see it now (it would miss a rewritten embedding)."""
        if kind == "embeddings":
            if not self.embeddings.ensure_folder(self.folders().embeddings):  # (adding it reloads)
                self.embeddings.reload()
        elif kind == "hypernetworks":
            self.hypernetworks.refresh()
        elif kind == "checkpoints":
            list_models = getattr(self.h.sd_models, "list_models", None)
            if callable(list_models):  # the checkpoint dropdown's refresh button then shows the new file
                list_models()
        elif kind == "lora":
            from .lora_list import refresh_host_lora_list

            refresh_host_lora_list()

    # --- settings --------------------------------------------------------------------------------------
    def on_ui_settings(self) -> None:
        if not self.settings_supported():
            return  # notes() says so in our tab
        settings = st.all_settings(self.hypernetworks.choices, self.hypernetworks.refresh)
        st.register(self.h.shared, settings)

    def settings_supported(self) -> bool:
        return hasattr(self.opts, "add_option") and hasattr(self.h.shared, "OptionInfo")

    # --- tabs --------------------------------------------------------------------------------------------
    def on_ui_train_tabs(self, params: Any) -> None:
        """Our training sub-tabs inside the WebUI's Train tab, previews reading its txt2img parameters."""
        import gradio as gr

        from ..ui import build_train_tabs

        try:
            build_train_tabs(self.runner, self.context(getattr(params, "txt2img_preview_params", None)),
                             title_prefix=TRAIN_TAB_PREFIX)
        except Exception as exc:  # noqa: BLE001 — our tabs failing must not take the Train tab down
            log.exception("Alchemy: building the training tabs failed")
            with gr.Tab(TAB_TITLE, elem_id="alchemy_train_error_tab"):
                gr.HTML(_error_html("the training tabs could not be built", exc))

    def on_ui_tabs(self) -> list[tuple[Any, str, str]]:
        """Our own top-level tab: the tagger and preprocessing (and the training tabs on hosts whose Train
        tab takes no sub-tabs)."""
        import gradio as gr

        from ..ui import build_dataset_tabs, build_train_tabs

        with gr.Blocks(analytics_enabled=False) as block:
            try:
                notes = self.notes()
                if notes:
                    gr.HTML("".join(f'<div class="alchemy-unsupported">{html.escape(n)}</div>' for n in notes),
                            elem_id="alchemy_host_notes")
                with gr.Tabs(elem_id="alchemy_tabs"):
                    build_dataset_tabs(self.runner, self.context())
                    if "on_ui_train_tabs" in self.h.missing_callbacks:
                        build_train_tabs(self.runner, self.context())
            except Exception as exc:  # noqa: BLE001
                log.exception("Alchemy: building the tab failed")
                gr.HTML(_error_html("the tab could not be built", exc), elem_id="alchemy_tab_error")
        return [(block, TAB_TITLE, TAB_ID)]

    def notes(self) -> list[str]:
        out = []
        if "on_ui_train_tabs" in self.h.missing_callbacks:
            out.append("This WebUI's Train tab takes no extension sub-tabs (script_callbacks.on_ui_train_tabs is "
                       "missing), so Alchemy's training tabs are here.")
        if self.h.missing or set(self.h.missing_callbacks) - {"on_ui_train_tabs"}:
            out.append("Parts of this WebUI Alchemy needs are missing: " + self.h.summary())
        lost = [name for name in self.h.missing_callbacks if name in WITHOUT_CALLBACK]
        if not self.settings_supported() and "on_ui_settings" not in lost:
            lost.append("on_ui_settings")
        out += [f"Without {name}: {WITHOUT_CALLBACK[name]}." for name in lost]
        if self.embeddings.unsupported:
            out.append(self.embeddings.unsupported)
        return out + self.problems

    # --- model and script life cycle -------------------------------------------------------------------
    def _job_takes_model(self) -> None:
        """A job (training, creating an embedding) starts using the model: the toggle's hypernetworks must
        not act on it meanwhile; the next generation applies them again, from the files as they are then."""
        self.hypernetworks.set_aside()
        self.aesthetic.undo()

    def on_model_loaded(self, sd_model: Any) -> None:
        self.watch.model_loaded(sd_model)
        self.aesthetic.undo()
        self.hypernetworks.model_loaded(sd_model)
        self.embeddings.ensure_folder(self.folders().embeddings)

    def on_script_unloaded(self) -> None:
        """Reload UI: take our patch off the model and stop a running job (it saves first)."""
        self.hypernetworks.undo()
        self.aesthetic.undo()
        p = self.runner.progress()
        if p.active or p.state == "queued":
            self.runner.interrupt()
            self.runner.wait(p.job_id, STOP_ON_UNLOAD_S)
        if self._tagger_slot is not None:
            self._tagger_slot.unload()

    def on_app_started(self, demo: Any, app: Any) -> None:
        from ..jobs.routes import add_progress_routes
        from .api import AlchemyApi, api_switches, register

        add_progress_routes(app, self.runner)
        enabled, credentials = api_switches(self.h.cmd_opts)
        if enabled:
            register(app, AlchemyApi(self.runner, self.context, self.list_embeddings, self.list_hypernetworks),
                     credentials=credentials)
        else:
            log.info("Alchemy: HTTP API /alchemy/v1 off (start the WebUI with --api to turn it on)")
        self.embeddings.ensure_folder(self.folders().embeddings)

    # --- generation hooks (the AlwaysVisible script) ---------------------------------------------------
    def process(self, p: Any) -> None:
        self.hypernetworks.process(p)

    def before_process_batch(self, p: Any, prompts: list[str] | None) -> None:
        if prompts is not None:
            self.hypernetworks.before_batch(prompts)

    def aesthetic_ui(self, is_img2img: bool) -> tuple[list, list]:
        from .aesthetic import build_script_ui

        return build_script_ui(self.aesthetic, is_img2img)

    def aesthetic_process(self, p: Any, args) -> None:
        from .aesthetic import options_from_args

        self.aesthetic.process(p, options_from_args(args))

    # --- listings (API) ----------------------------------------------------------------------------------
    def list_embeddings(self) -> list[dict]:
        from ..embeddings.library import EmbeddingLibrary

        folder = self.folders().embeddings
        listed = self.embeddings.listing()
        known = {entry["name"] for entry in listed}
        library = EmbeddingLibrary(folder)
        for entry in [*library.entries(), *library.skipped]:
            if entry.name in known:
                continue
            emb = entry.embedding
            listed.append({"name": entry.name, "usable": entry.error is None and self.embeddings.unsupported is None,
                           "vectors": emb.num_vectors if emb is not None else 0,
                           "width": emb.width if emb is not None else 0,
                           "step": emb.step if emb is not None else None, "file": str(entry.path),
                           "reason": entry.error or self.embeddings.unsupported})
        return listed

    def list_hypernetworks(self) -> list[dict]:
        library = self.hypernetwork_library()
        out = [{"name": e.name, "file": str(e.path), "widths": list(e.widths), "usable": True, "reason": None}
               for e in library.entries()]
        out += [{"name": e.name, "file": str(e.path), "widths": list(e.widths), "usable": False, "reason": e.error}
                for e in library.skipped]
        mine = {e["name"] for e in out}
        out += [{"name": name, "file": path, "widths": [], "usable": True, "reason": None}
                for name, path in self.hypernetworks.host_names().items() if name not in mine]
        return out


def _hypernetwork_library(folder: Path):
    from ..hypernetworks.library import HypernetworkLibrary

    return HypernetworkLibrary(folder)


def _error_html(what: str, exc: BaseException) -> str:
    text = exc.message if isinstance(exc, AlchemyError) else f"{type(exc).__name__}: {exc}"
    return f'<div class="alchemy-unsupported">Alchemy: {html.escape(what)}: {html.escape(text)} ' \
           f'(details in the console)</div>'
