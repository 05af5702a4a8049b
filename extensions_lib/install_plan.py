"""What ``install.py`` installs inside the WebUI, as a pure function so it can be tested.

Rules (the host pins its own stack and must not be disturbed):
- install only packages that are missing; never reinstall, upgrade or downgrade what the host has;
- the host's pinned packages (torch, gradio, transformers, ...) are never touched, even if missing;
- exactly one onnxruntime: ``onnxruntime-gpu`` with a CUDA build of torch, ``onnxruntime`` otherwise,
  nothing if either is present; both present is a known breakage, reported with its fix;
- exactly one OpenCV: the WebUI already has ``opencv-python``; ``opencv-python-headless`` only when no OpenCV
  wheel is present (two of them write the same ``cv2`` package);
- no TensorFlow, ever.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Packages the WebUI v1.10.1 installs and pins itself; we rely on its versions.
HOST_PACKAGES = ("torch", "torchvision", "gradio", "fastapi", "httpx", "transformers", "open-clip-torch",
                 "Pillow", "numpy", "safetensors")

# What the core needs beyond the host. Lower bounds only: an existing install is always kept.
EXTRA_PACKAGES = ("huggingface_hub", "tqdm")
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")


@dataclass
class InstallPlan:
    to_install: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_install(is_installed: Callable[[str], bool], cuda_torch: bool) -> InstallPlan:
    """Decide what to pip-install given which distributions are present and whether torch has CUDA."""
    plan = InstallPlan()
    for name in EXTRA_PACKAGES:
        if not is_installed(name):
            plan.to_install.append(name)
    cpu_ort, gpu_ort = is_installed("onnxruntime"), is_installed("onnxruntime-gpu")
    if cpu_ort and gpu_ort:
        plan.warnings.append(
            "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files and the "
            "tagger may run on the CPU or fail to load. Fix: pip uninstall -y onnxruntime onnxruntime-gpu, "
            "then pip install " + ("onnxruntime-gpu" if cuda_torch else "onnxruntime"))
    elif not (cpu_ort or gpu_ort):
        plan.to_install.append("onnxruntime-gpu" if cuda_torch else "onnxruntime")
    if not any(is_installed(name) for name in OPENCV_DISTRIBUTIONS):
        plan.to_install.append("opencv-python-headless")
    return plan
