"""Stand-in for ``modules/scripts.py`` (v1.10.1): ``Script``, ``AlwaysVisible``, ``basedir()`` and a
``load_scripts`` that imports extension scripts exactly as the host does (module name = file name, the
extension root prepended to ``sys.path`` only during the import, ``basedir()`` = that root meanwhile)."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback

from modules import script_callbacks


AlwaysVisible = object()


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'


current_basedir = None
"""The extension root while its scripts are being imported; None otherwise (basedir() then answers the
WebUI root, here the current folder)."""

scripts_data: list[tuple[type, str, object]] = []
"""(Script subclass, path, module) of every loaded script, as the host keeps them."""

load_errors: list[tuple[str, str]] = []


def basedir():
    return current_basedir or os.getcwd()


def load_scripts(extension_roots):
    """Import ``<root>/scripts/*.py`` of each extension root (sorted), after ``clear_callbacks()``."""
    global current_basedir
    script_callbacks.clear_callbacks()
    scripts_data.clear()
    for root in extension_roots:
        folder = os.path.join(root, "scripts")
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            path = os.path.join(folder, filename)
            if not filename.endswith(".py") or not os.path.isfile(path):
                continue
            syspath = sys.path
            current_basedir = root
            script_callbacks.current_script_file = path
            try:
                sys.path = [root] + sys.path
                spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                for name in dir(module):
                    obj = getattr(module, name)
                    if isinstance(obj, type) and issubclass(obj, Script) and obj is not Script:
                        scripts_data.append((obj, path, module))
            except Exception:
                load_errors.append((path, traceback.format_exc()))
            finally:
                sys.path = syspath
                current_basedir = None
                script_callbacks.current_script_file = None
