"""Alchemy's WebUI glue (AUTOMATIC1111 v1.10.1; older/newer hosts and forks fail soft).

The host imports this file as a top-level module named "alchemy.py" with the extension root on
``sys.path`` only during the import: everything of ours is imported here, at import time (later
imports of ``extensions_lib`` submodules resolve through the already imported package). Host modules
are imported one by one; what is missing is recorded and the tabs say what it turns off. Nothing here
may raise into the WebUI's start-up. All logic lives in ``extensions_lib/host/``.
"""
import importlib
import logging
import os
import sys

log = logging.getLogger("alchemy")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_extension = None
_problem = None

try:
    from modules import scripts as _scripts  # the host's Script base class; required for the toggle script
except Exception as _exc:  # noqa: BLE001 — not inside a WebUI at all
    _scripts = None
    _problem = f"not running inside the WebUI ({_exc})"


def _import_host(handles):
    from extensions_lib.host.handles import HOST_MODULES

    for name in HOST_MODULES:
        try:
            setattr(handles, name, importlib.import_module(f"modules.{name}"))
        except Exception as exc:  # noqa: BLE001 — a host without this module: record, go on
            handles.missing[name] = f"{type(exc).__name__}: {exc}"


def _build():
    root = _scripts.basedir() if _scripts is not None else _ROOT  # valid only during this import
    import extensions_lib
    from extensions_lib.host.extension import AlchemyExtension
    from extensions_lib.host.handles import HostHandles

    ours = os.path.realpath(os.path.join(_ROOT, "extensions_lib"))
    found = os.path.realpath(os.path.dirname(extensions_lib.__file__))
    if found != ours:
        raise ImportError(f"another extension's 'extensions_lib' ({found}) was imported instead of Alchemy's "
                          f"({ours}); disable one of them")
    handles = HostHandles(extension_root=root)
    _import_host(handles)
    return AlchemyExtension(handles)


def _guarded(name, fn, default=None):
    """A callback that logs our errors instead of raising them into the host."""
    def call(*args):
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("Alchemy: %s failed", name)
            return default
    call.__name__ = f"alchemy_{name}"
    return call


def _register(extension):
    callbacks = extension.h.script_callbacks
    wanted = [("on_ui_settings", extension.on_ui_settings, None),
              ("on_ui_train_tabs", extension.on_ui_train_tabs, None),
              ("on_ui_tabs", extension.on_ui_tabs, []),
              ("on_model_loaded", extension.on_model_loaded, None),
              ("on_script_unloaded", extension.on_script_unloaded, None),
              ("on_app_started", extension.on_app_started, None)]
    for name, fn, default in wanted:
        registrar = getattr(callbacks, name, None)
        if registrar is None:
            extension.h.missing_callbacks.append(name)
            continue
        try:
            registrar(_guarded(name, fn, default), name=f"alchemy_{name}")
        except TypeError:  # hosts before 1.9 take no name=
            registrar(_guarded(name, fn, default))
    if extension.h.missing or extension.h.missing_callbacks:
        log.warning("Alchemy: %s", extension.h.summary())
    if extension.h.current_model() is not None:  # scripts reloaded with a model loaded: no callback for it
        _guarded("on_model_loaded", extension.on_model_loaded)(extension.h.current_model())


if _scripts is not None:
    sys.path.insert(0, _ROOT)  # the host does this too, but only for the duration of this import
    try:
        _extension = _build()
        if _extension.h.script_callbacks is None:
            _problem = "modules.script_callbacks is missing: " + _extension.h.summary()
        else:
            _register(_extension)
    except Exception as _exc:  # noqa: BLE001 — never break the WebUI's start-up
        _extension, _problem = None, f"{type(_exc).__name__}: {_exc}"
    finally:
        if sys.path and sys.path[0] == _ROOT:
            sys.path.pop(0)
    if _problem:
        log.error("Alchemy is disabled: %s", _problem)


if _scripts is not None and _extension is not None:
    class AlchemyScript(_scripts.Script):
        """Always on, no controls: applies the hypernetwork toggle from Settings > Alchemy."""

        def title(self):
            return "Alchemy"

        def show(self, is_img2img):
            return _scripts.AlwaysVisible

        def ui(self, is_img2img):
            return []

        def process(self, p, *args):
            _extension.process(p)

        def before_process_batch(self, p, *args, **kwargs):
            _extension.before_process_batch(p, kwargs.get("prompts"))


    class AlchemyAestheticScript(_scripts.Script):
        """Aesthetic Gradients in txt2img and img2img (an accordion; off until an embedding is chosen)."""

        def title(self):
            return "Alchemy aesthetic gradients"

        def show(self, is_img2img):
            return _scripts.AlwaysVisible

        def ui(self, is_img2img):
            try:
                components, self.infotext_fields = _extension.aesthetic_ui(is_img2img)
            except Exception:  # noqa: BLE001 — no accordion rather than a broken txt2img tab
                log.exception("Alchemy: building the aesthetic gradients controls failed")
                return []
            return components

        def process(self, p, *args):
            if args:
                _extension.aesthetic_process(p, args)

        def postprocess(self, p, processed, *args):
            _extension.aesthetic.undo()
