"""Run by the WebUI (its own Python, ``import launch`` available) before start-up.

Installs only what is missing (see ``extensions_lib/install_plan.py`` for the rules). A failure here
is printed and never stops the WebUI from starting.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch  # noqa: E402  (the WebUI's launcher module)

from extensions_lib.install_plan import plan_install  # noqa: E402


def _cuda_torch() -> bool:
    try:
        import torch
        return torch.version.cuda is not None
    except Exception:
        return False


def main() -> None:
    plan = plan_install(launch.is_installed, _cuda_torch())
    for warning in plan.warnings:
        print(f"[Alchemy] warning: {warning}")
    for package in plan.to_install:
        try:
            launch.run_pip(f"install {package}", f"{package} for Alchemy")
        except Exception as exc:  # start-up must go on
            print(f"[Alchemy] could not install {package}: {exc}")


main()
