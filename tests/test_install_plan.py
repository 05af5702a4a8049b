"""install.py never moves a package the WebUI pins, and picks the onnxruntime that fits the host's torch.

The host is a WebUI v1.10.1 venv given by its freeze (``fixtures/webui_v1_10_1``: CUDA 12.1 torch, the
launcher's default, and a CPU torch). Resolution is pip's own: install.py runs in a Python that sees only
that freeze (fake dist-infos, a fake torch reporting the CUDA facts, the WebUI's ``launch`` recording the
pip command), then real pip resolves the recorded command against a local index in which every package
also has a newer release and the newest onnxruntimes want protobuf>=4.25 and numpy>=2 (how the reported
breakage happened). Every package the report would install must keep its frozen version.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from extensions_lib.install_plan import HostFacts, canonical, onnxruntime_choice, parse_pins, plan_install
from webui_standin.harness import EXTENSION_ROOT

FIXTURES = Path(__file__).with_name("fixtures") / "webui_v1_10_1"
PINS = parse_pins((FIXTURES / "requirements_versions.txt").read_text())
FREEZES = {"cu121": parse_pins((FIXTURES / "freeze-cu121.txt").read_text()),
           "cpu": parse_pins((FIXTURES / "freeze-cpu.txt").read_text())}

# onnxruntime releases of the local index: version -> Requires-Dist.
_ORT_DEPS = ["coloredlogs", "flatbuffers", "numpy>=1.21.6", "packaging", "protobuf", "sympy"]
_ORT_NEWEST_DEPS = ["coloredlogs", "flatbuffers", "numpy>=2", "packaging", "protobuf>=4.25.1", "sympy"]
ORT_RELEASES = {"onnxruntime-gpu": {"1.18.1": _ORT_DEPS, "1.20.2": _ORT_DEPS, "1.26.0": _ORT_DEPS,
                                    "1.31.1": _ORT_NEWEST_DEPS},
                "onnxruntime": {"1.18.1": _ORT_DEPS, "1.26.0": _ORT_DEPS, "1.32.0": _ORT_NEWEST_DEPS}}
NEW_PACKAGES = {"coloredlogs": ["humanfriendly>=9"], "humanfriendly": [], "flatbuffers": [],
                "huggingface-hub": ["tqdm>=4.42.1", "packaging>=20.9", "filelock"]}


def test_fixtures_hold_the_webuis_pins():
    assert PINS["protobuf"] == "3.20.0" and PINS["gradio"] == "3.41.2" and "torch" not in PINS
    for freeze in FREEZES.values():
        for name, pin in PINS.items():  # a fresh v1.10.1 venv has exactly its pins ("0.15" is 0.15.0)
            assert Version(freeze[name]) == Version(pin), name
    assert FREEZES["cu121"]["torch"] == "2.1.2+cu121" and FREEZES["cpu"]["torch"] == "2.1.2+cpu"


@pytest.mark.parametrize("cuda, gpu, expected", [
    ("12.1", True, "onnxruntime-gpu>=1.19,<1.27"),
    ("11.8", True, "onnxruntime-gpu>=1.15,<1.19"),
    ("13.0", True, "onnxruntime-gpu>=1.27,<2"),
    ("12.1", False, "onnxruntime"),  # the launcher's CUDA torch on a machine without a driver
    (None, False, "onnxruntime"),
    ("10.2", True, "onnxruntime"),  # no onnxruntime-gpu release on PyPI for it
])
def test_onnxruntime_build_follows_torchs_cuda_major_and_the_gpu(cuda, gpu, expected):
    requirement, why = onnxruntime_choice(cuda, gpu)
    assert requirement == expected
    assert ("CPU build" in why) == (expected == "onnxruntime")


def test_every_installed_package_and_pin_is_held():
    installed = {**FREEZES["cu121"]}
    del installed["tqdm"]
    plan = plan_install(HostFacts(installed=installed, pins=PINS, torch_cuda="12.1", gpu_usable=True))
    assert plan.requirements == ["tqdm", "onnxruntime-gpu>=1.19,<1.27"]
    held = parse_pins("\n".join(plan.constraints))
    assert held == {**PINS, **installed}  # tqdm is neither: free to install
    assert "CUDA 12" in plan.explanation and "\n" not in plan.explanation


def test_nothing_missing_means_nothing_installed():
    installed = {**FREEZES["cpu"], "onnxruntime-gpu": "1.20.2"}
    plan = plan_install(HostFacts(installed=installed, pins=PINS))
    assert plan.requirements == [] and plan.warnings == []
    assert plan.explanation == "[Alchemy] all dependencies present; nothing installed"


def test_the_webuis_opencv_is_used_never_a_second_one():
    for wheel in ("opencv-python", "opencv-python-headless", "opencv-contrib-python"):
        installed = {k: v for k, v in FREEZES["cpu"].items() if not k.startswith("opencv")}
        plan = plan_install(HostFacts(installed={**installed, wheel: "4.10.0.84", "onnxruntime": "1.20.1"}))
        assert plan.requirements == [], wheel
    bare = {k: v for k, v in FREEZES["cpu"].items() if not k.startswith("opencv")}
    plan = plan_install(HostFacts(installed={**bare, "onnxruntime": "1.20.1"}))
    assert plan.requirements == ["opencv-python-headless"]


def test_both_onnxruntimes_reported_with_fix_and_nothing_added():
    installed = {**FREEZES["cu121"], "onnxruntime": "1.20.1", "onnxruntime_gpu": "1.20.1"}
    plan = plan_install(HostFacts(installed=installed, torch_cuda="12.1", gpu_usable=True))
    assert plan.requirements == []
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in plan.warnings[0]
    assert plan.warnings[0].endswith('pip install "onnxruntime-gpu>=1.19,<1.27"')


# ---- install.py against a recorded host, resolved by real pip ---------------------------------------------

FAKE_LAUNCH = '''
import os, shlex


def is_installed(package):
    raise AssertionError("install.py decides from the installed versions, not from is_installed")


def run_pip(command, desc=None, live=False):
    args = shlex.split(command)
    constraints = open(args[args.index("-c") + 1]).read()
    with open(os.environ["FAKE_PIP_LOG"], "a") as fh:
        fh.write(command + "\\n" + constraints + "=====\\n")
    if os.environ.get("FAKE_PIP_FAILS"):
        raise RuntimeError("Couldn't install " + desc)
'''

FAKE_TORCH = '''
import os


class version:
    cuda = os.environ.get("FAKE_TORCH_CUDA") or None


class cuda:
    @staticmethod
    def is_available():
        return os.environ.get("FAKE_GPU") == "1"
'''


def _host_python(tmp_path: Path, freeze: dict[str, str]) -> Path:
    """A folder that, put on PYTHONPATH of ``python -S``, looks like the host's site-packages."""
    site = tmp_path / f"site{len(list(tmp_path.glob('site*')))}"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (site / "launch.py").write_text(FAKE_LAUNCH)
    for name, version in freeze.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return site


def _run_install_py(tmp_path: Path, freeze: dict[str, str], *, cuda: str | None, gpu: bool, fails: bool = False):
    webui = tmp_path / "webui"
    webui.mkdir(exist_ok=True)
    (webui / "requirements_versions.txt").write_text((FIXTURES / "requirements_versions.txt").read_text())
    log = tmp_path / "pip.log"
    log.unlink(missing_ok=True)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_host_python(tmp_path, freeze)),
           "FAKE_PIP_LOG": str(log), "FAKE_TORCH_CUDA": cuda or "", "FAKE_GPU": "1" if gpu else "0",
           "FAKE_PIP_FAILS": "1" if fails else ""}
    out = subprocess.run([sys.executable, "-S", str(EXTENSION_ROOT / "install.py")], cwd=webui, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = [c for c in log.read_text().split("=====\n") if c] if log.exists() else []
    return out.stdout, [(c.split("\n", 1)[0], c.split("\n", 1)[1]) for c in calls]


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as zf:
        info = f"{stem}.dist-info"
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires))
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """Every frozen package at its version and at a newer major, and the onnxruntime releases."""
    folder = tmp_path_factory.mktemp("index")
    for name, version in {**FREEZES["cu121"], **FREEZES["cpu"]}.items():
        _wheel(folder, name, version, [])
        newer = str(int(version.split(".")[0].split("+")[0]) + 1) + ".0.0"
        _wheel(folder, name, newer, [])
    for name, releases in ORT_RELEASES.items():
        for version, requires in releases.items():
            _wheel(folder, name, version, requires)
    for name, requires in NEW_PACKAGES.items():
        _wheel(folder, name, "9.0.0", requires)
    _wheel(folder, "tqdm", "9.0.0", [])
    return folder


def _resolve(tmp_path: Path, index: Path, command: str, constraints: str | None) -> dict[str, str]:
    """What real pip would install for `command` (install.py's run_pip arguments) on an empty venv."""
    args = shlex.split(command)
    if constraints is None:  # what the old install.py did: the same requirements, no constraints
        i = args.index("-c")
        del args[i:i + 2]
    else:
        path = tmp_path / "constraints.txt"
        path.write_text(constraints)
        args[args.index("-c") + 1] = str(path)
    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    out = subprocess.run([sys.executable, "-m", "pip", *args, "--dry-run", "--ignore-installed", "--no-index",
                          "--find-links", str(index), "--report", str(report), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


@pytest.mark.parametrize("variant, cuda, gpu, onnxruntime, version", [
    ("cu121", "12.1", True, "onnxruntime-gpu", "1.26.0"),  # newest CUDA 12 build that keeps protobuf 3.20
    ("cu121", "12.1", False, "onnxruntime", "1.26.0"),     # CUDA torch, no usable GPU: the CPU build
    ("cpu", None, False, "onnxruntime", "1.26.0"),
])
def test_install_py_on_a_v1_10_1_host_moves_no_pinned_package(tmp_path, index, variant, cuda, gpu, onnxruntime,
                                                              version):
    freeze = {k: v for k, v in FREEZES[variant].items() if k not in ("huggingface-hub",)}
    stdout, calls = _run_install_py(tmp_path, freeze, cuda=cuda, gpu=gpu)
    lines = [line for line in stdout.splitlines() if line.startswith("[Alchemy]")]
    assert len(lines) == 1 and f"installing huggingface_hub, {onnxruntime}" in lines[0], stdout
    (command, constraints), = calls
    resolved = _resolve(tmp_path, index, command, constraints)
    assert resolved[onnxruntime] == version and resolved["huggingface-hub"] == "9.0.0"
    moved = {name: (freeze[name], v) for name, v in resolved.items() if name in freeze and freeze[name] != v}
    assert moved == {}
    assert resolved["protobuf"] == freeze["protobuf"] == PINS["protobuf"] and resolved["numpy"] == PINS["numpy"]
    # The same request without the constraints (what install.py did before) moves the host's pins.
    unconstrained = _resolve(tmp_path, index, command, None)
    assert unconstrained["protobuf"] != PINS["protobuf"] and unconstrained["numpy"] != PINS["numpy"]


def test_install_py_says_what_it_did_and_never_stops_start_up(tmp_path):
    freeze = {k: v for k, v in FREEZES["cu121"].items() if k != "tqdm"}
    stdout, calls = _run_install_py(tmp_path, freeze, cuda="12.1", gpu=True, fails=True)
    assert len(calls) == 1 and "could not install tqdm" in stdout  # reported; exit status 0 above
    stdout, calls = _run_install_py(tmp_path, {**freeze, "tqdm": "4.66.4", "onnxruntime": "1.17.1"}, cuda="12.1",
                                    gpu=True)
    assert calls == [] and stdout.strip() == "[Alchemy] all dependencies present; nothing installed"

