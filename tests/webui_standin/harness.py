"""A fresh stand-in WebUI per test: ``with standin_host(data_dir) as host: ...``.

``host`` is a namespace of the stand-in ``modules.*`` (``host.shared``, ``host.script_callbacks``...) with
helpers to load our extension's scripts the way the host does and to load a tiny checkpoint as
``shared.sd_model``. Everything is torn down afterwards (``modules`` leaves ``sys.modules``), so hosts never
share state between tests.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

STANDIN_DIR = Path(__file__).resolve().parent
EXTENSION_ROOT = STANDIN_DIR.parents[1]

MODULES = ("shared", "script_callbacks", "scripts", "sd_models", "sd_hijack", "call_queue", "progress", "lowvram",
           "processing", "extra_networks", "devices", "errors", "options", "shared_state")


def _purge() -> None:
    for name in [n for n in sys.modules if n in ("modules", "networks") or n.startswith("modules.")]:
        del sys.modules[name]


@contextlib.contextmanager
def standin_host(data_dir: Path, *, medvram: bool = False, missing: tuple[str, ...] = (),
                 lora_extension: bool = True) -> Iterator[SimpleNamespace]:
    """A stand-in host rooted at `data_dir`.

    medvram: simulate ``--medvram``. missing: names of ``script_callbacks`` registrars (e.g.
    ``"on_ui_train_tabs"``) or whole modules (``"modules.call_queue"``) this host lacks, to test fail-soft.
    lora_extension: whether the built-in Lora extension is loaded (its ``--lora-dir`` option and
    ``networks`` module, ``ns.networks``), as in a stock WebUI.
    """
    _purge()
    old_env = os.environ.get("STANDIN_DATA_PATH")
    os.environ["STANDIN_DATA_PATH"] = str(data_dir)
    sys.path.insert(0, str(STANDIN_DIR))
    blocked = [m for m in missing if m.startswith("modules.")]
    try:
        ns = SimpleNamespace(**{name: importlib.import_module(f"modules.{name}") for name in MODULES})
        ns.hypernetwork = importlib.import_module("modules.hypernetworks.hypernetwork")
        ns.data_dir = Path(data_dir)
        ns.shared.cmd_opts.medvram = medvram
        for name in missing:
            if not name.startswith("modules."):
                delattr(ns.script_callbacks, name)
        for name in blocked:
            sys.modules[name] = None  # makes "import modules.x" raise ImportError, as on a host without it
            if hasattr(sys.modules["modules"], name.split(".", 1)[1]):
                delattr(sys.modules["modules"], name.split(".", 1)[1])
        ns.networks = None
        if lora_extension:  # its preload.py adds --lora-dir; its script imports networks at start-up
            ns.shared.cmd_opts.lora_dir = os.path.join(ns.shared.models_path, "Lora")
            sys.path.insert(0, str(STANDIN_DIR / "lora_ext"))
            try:
                ns.networks = importlib.import_module("networks")
                ns.networks.list_available_networks()
            except ImportError:  # a host missing what the extension imports: it fails to load there too
                ns.networks = None
            finally:
                sys.path.remove(str(STANDIN_DIR / "lora_ext"))
        ns.extra_networks.initialize()
        ns.extra_networks.register_default_extra_networks()
        ns.shared.reload_hypernetworks()

        def load_scripts():
            ns.scripts.load_scripts([str(EXTENSION_ROOT)])
            return [script for script in ns.processing.always_on_scripts()]

        def load_model(checkpoint, cached=True):
            return ns.sd_models.load_model(checkpoint, cached=cached)

        def build_ui():
            """What ``ui.create_ui`` does with extension callbacks: settings, train sub-tabs, tabs."""
            ns.script_callbacks.ui_settings_callback()
            return ns.script_callbacks.ui_tabs_callback()

        ns.load_scripts, ns.load_model, ns.build_ui = load_scripts, load_model, build_ui
        yield ns
    finally:
        with contextlib.suppress(Exception):
            sys.modules.get("modules.script_callbacks") and sys.modules["modules.script_callbacks"].script_unloaded_callback()
        _purge()
        if str(STANDIN_DIR) in sys.path:
            sys.path.remove(str(STANDIN_DIR))
        if old_env is None:
            os.environ.pop("STANDIN_DATA_PATH", None)
        else:
            os.environ["STANDIN_DATA_PATH"] = old_env
