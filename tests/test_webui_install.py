"""install.py as the WebUI runs it: its own process, ``import launch`` resolving to the WebUI's launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from extensions_lib.install_plan import HOST_PACKAGES
from webui_standin.harness import EXTENSION_ROOT

FAKE_LAUNCH = '''
import json, os

INSTALLED = set(json.loads(os.environ["FAKE_INSTALLED"]))


def is_installed(package):
    return package in INSTALLED


def run_pip(command, desc=None, live=False):
    with open(os.environ["FAKE_PIP_LOG"], "a") as fh:
        fh.write(command + "\\n")
    if command.split()[-1] == os.environ.get("FAKE_PIP_FAILS"):
        raise RuntimeError("Couldn't install " + desc)
'''


def test_install_py_installs_only_whats_missing_and_never_stops_start_up(tmp_path):
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "launch.py").write_text(FAKE_LAUNCH)
    log = tmp_path / "pip.log"
    env = {**os.environ, "PYTHONPATH": str(webui), "FAKE_INSTALLED": json.dumps([*HOST_PACKAGES, "opencv-python"]),  # the WebUI's deps bring OpenCV
           "FAKE_PIP_LOG": str(log), "FAKE_PIP_FAILS": "huggingface_hub"}
    out = subprocess.run([sys.executable, str(EXTENSION_ROOT / "install.py")], cwd=webui, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr  # a failed pip install is reported, start-up goes on
    assert "could not install huggingface_hub" in out.stdout
    onnxruntime = "onnxruntime-gpu" if torch.version.cuda else "onnxruntime"  # the same Python's torch
    assert log.read_text().splitlines() == ["install huggingface_hub", "install tqdm", f"install {onnxruntime}"]
