"""Stand-in for ``modules/script_callbacks.py`` (v1.10.1): registrars ``on_X(callback, *, name=None)`` and the
host-side ``X_callback(...)`` functions that call them. Exceptions in callbacks are caught and recorded
(``errors``), as the host reports and ignores them."""
from __future__ import annotations

import inspect
import os
import traceback
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

errors: list[tuple[str, str]] = []
"""(callback id, formatted traceback) of every callback that raised: the host prints these."""


class UiTrainTabParams:
    def __init__(self, txt2img_preview_params):
        self.txt2img_preview_params = txt2img_preview_params


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_image_saved=[],
    callbacks_image_saved=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
)

current_script_file: str | None = None
"""Set by ``scripts.load_scripts`` while a script file is executed (the host inspects the stack instead)."""


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None, category=None, filename=None):
    if filename is None:
        filename = current_script_file or inspect.stack()[2].filename
    unique_callback_name = f"{os.path.basename(filename)}/{category}" + (f"/{name}" if name else "")
    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def _call(category, *args):
    results = []
    for c in callback_map["callbacks_" + category]:
        try:
            results.append(c.callback(*args))
        except Exception:
            errors.append((c.name, traceback.format_exc()))
    return results


# ---- host side: what the WebUI calls ---------------------------------------------------------------

def app_started_callback(demo, app):
    _call("app_started", demo, app)


def model_loaded_callback(sd_model):
    _call("model_loaded", sd_model)


def ui_tabs_callback():
    res = []
    for out in _call("ui_tabs"):
        res += out or []
    return res


def ui_train_tabs_callback(params: UiTrainTabParams):
    _call("ui_train_tabs", params)


def ui_settings_callback():
    _call("ui_settings")


def infotext_pasted_callback(infotext: str, params: dict):
    _call("infotext_pasted", infotext, params)


def script_unloaded_callback():
    for c in reversed(callback_map["callbacks_script_unloaded"]):
        try:
            c.callback()
        except Exception:
            errors.append((c.name, traceback.format_exc()))


def before_ui_callback():
    _call("before_ui")


# ---- registrars: what extensions call -------------------------------------------------------------

def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_before_reload(callback, *, name=None):
    add_callback(callback_map['callbacks_on_reload'], callback, name=name, category='on_reload')


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_train_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_train_tabs'], callback, name=name, category='ui_train_tabs')


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_before_image_saved(callback, *, name=None):
    add_callback(callback_map['callbacks_before_image_saved'], callback, name=name, category='before_image_saved')


def on_image_saved(callback, *, name=None):
    add_callback(callback_map['callbacks_image_saved'], callback, name=name, category='image_saved')


def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map['callbacks_infotext_pasted'], callback, name=name, category='infotext_pasted')


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')


def remove_current_script_callbacks():
    filename = current_script_file or inspect.stack()[1].filename
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)
