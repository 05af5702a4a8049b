"""Run by the WebUI (its own Python, ``import launch`` available) before start-up.

Installs only what is missing, under constraints that hold every installed package and every pin of the
host's ``requirements_versions.txt`` at its version (rules in ``extensions_lib/install_plan.py``), and says
in one line what it did and why. A failure here is printed and never stops the WebUI from starting.
"""
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import launch  # noqa: E402  (the WebUI's launcher module)

from extensions_lib.install_plan import HostFacts, parse_pins, plan_install  # noqa: E402


def _installed() -> dict:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name, dist.version)
    return found


def _host_pins() -> dict:
    # launch_utils reads REQS_FILE (default requirements_versions.txt) from the WebUI's folder, which is the
    # cwd it runs us in; <webui>/extensions/<us>/ is the fallback for a different cwd.
    name = os.environ.get("REQS_FILE", "requirements_versions.txt")
    for candidate in (Path(name), HERE.parent.parent / name):
        if candidate.is_file():
            return parse_pins(candidate.read_text(encoding="utf-8", errors="replace"))
    return {}


def _torch() -> tuple:
    try:
        import torch
        cuda = torch.version.cuda
        return cuda, bool(cuda) and torch.cuda.is_available()
    except Exception:
        return None, False


def main() -> None:
    cuda, gpu = _torch()
    plan = plan_install(HostFacts(installed=_installed(), pins=_host_pins(), torch_cuda=cuda, gpu_usable=gpu))
    for warning in plan.warnings:
        print(f"[Alchemy] warning: {warning}")
    print(plan.explanation)
    if not plan.requirements:
        return
    handle, constraints = tempfile.mkstemp(prefix="alchemy-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as fh:
            fh.write("\n".join(plan.constraints) + "\n")
        launch.run_pip(plan.pip_arguments(constraints), f"{', '.join(plan.requirements)} for Alchemy")
    except Exception as exc:  # start-up must go on
        print(f"[Alchemy] could not install {', '.join(plan.requirements)} without moving a package the WebUI "
              f"pins: {exc}. The tagger needs onnxruntime; install a release that fits by hand.")
    finally:
        os.unlink(constraints)


main()
