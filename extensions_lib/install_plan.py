"""What ``install.py`` installs inside the WebUI, as a pure function of the host's facts so it can be tested.

Rules (the host pins its own stack and must not be disturbed):
- install only what is missing; what is installed is never reinstalled, upgraded or downgraded;
- every installed distribution, and every pin of the host's ``requirements_versions.txt``, goes into a pip
  constraints file, so a new package whose newest release wants e.g. protobuf 7 resolves to an older
  release that fits protobuf 3.20 (or pip fails, and start-up goes on) instead of moving the host's pin;
- exactly one onnxruntime: ``onnxruntime-gpu`` only when torch is a CUDA build AND a GPU is usable (the
  WebUI's default torch is a CUDA build that reports ``torch.version.cuda`` without any driver), limited
  to the releases built for torch's CUDA major; nothing if either onnxruntime is present (both present is a
  known breakage, reported with its fix);
- exactly one OpenCV: the WebUI already has ``opencv-python``; ``opencv-python-headless`` only when no OpenCV
  wheel is present (two of them write the same ``cv2`` package);
- no TensorFlow, ever.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

# What the core needs beyond what the WebUI installs itself. Lower bounds only: an existing install is kept.
EXTRA_PACKAGES = ("huggingface_hub", "tqdm")
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")

# onnxruntime-gpu releases on PyPI by the CUDA major they are built for: 1.19 made CUDA 12 the default
# (CUDA 11.8 before), 1.27 moved to CUDA 13 (microsoft/onnxruntime PR #21758 and issue #29767).
ONNXRUNTIME_GPU_FOR_CUDA = {11: ">=1.15,<1.19", 12: ">=1.19,<1.27", 13: ">=1.27,<2"}

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")
_VERSION = re.compile(r"^([0-9]+!)?[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[A-Za-z0-9.]+)?$")


def canonical(name: str) -> str:
    """PEP 503 name: ``Open_Clip.Torch`` and ``open-clip-torch`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements or ``pip freeze`` file -> {canonical name: version};
    unpinned, URL, editable and comment lines carry no version and are left out."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = _PINNED.match(line)
        if match and _VERSION.match(match.group(2)):
            pins[canonical(match.group(1))] = match.group(2)
    return pins


@dataclass(frozen=True)
class HostFacts:
    """installed: distribution -> version of the host's Python; pins: its requirements_versions.txt;
    torch_cuda: ``torch.version.cuda`` (None: CPU build or no torch); gpu_usable: ``torch.cuda.is_available()``."""

    installed: Mapping[str, str]
    pins: Mapping[str, str] = field(default_factory=dict)
    torch_cuda: str | None = None
    gpu_usable: bool = False


@dataclass
class InstallPlan:
    requirements: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    explanation: str = ""
    warnings: list[str] = field(default_factory=list)

    def pip_arguments(self, constraints_path: str) -> str:
        """The argument string for the WebUI's ``launch.run_pip`` (it runs through a shell: everything
        is double-quoted, which both POSIX shells and cmd.exe read as one word; ``<`` needs it)."""
        return " ".join(["install", "-c", f'"{constraints_path}"', *(f'"{r}"' for r in self.requirements)])


def onnxruntime_choice(torch_cuda: str | None, gpu_usable: bool) -> tuple[str, str]:
    """(requirement, why) for the onnxruntime build that fits the host's torch."""
    if not torch_cuda:
        return "onnxruntime", "CPU build: torch has no CUDA"
    if not gpu_usable:
        return "onnxruntime", f"CPU build: torch is built for CUDA {torch_cuda} but no GPU is usable"
    major = int(str(torch_cuda).split(".")[0])
    if major not in ONNXRUNTIME_GPU_FOR_CUDA:
        return "onnxruntime", f"CPU build: no onnxruntime-gpu release is built for torch's CUDA {torch_cuda}"
    return (f"onnxruntime-gpu{ONNXRUNTIME_GPU_FOR_CUDA[major]}",
            f"GPU build for CUDA {major}, matching torch's CUDA {torch_cuda}")


def plan_install(facts: HostFacts) -> InstallPlan:
    """Decide what to pip-install, and under which constraints, from the host's facts."""
    installed = {canonical(k): v for k, v in facts.installed.items()}
    plan = InstallPlan()
    reasons = []
    for name in EXTRA_PACKAGES:
        if canonical(name) not in installed:
            plan.requirements.append(name)
    cpu_ort, gpu_ort = "onnxruntime" in installed, "onnxruntime-gpu" in installed
    if cpu_ort and gpu_ort:
        wanted = onnxruntime_choice(facts.torch_cuda, facts.gpu_usable)[0]
        plan.warnings.append(
            "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files and the "
            "tagger may run on the CPU or fail to load. Fix: pip uninstall -y onnxruntime onnxruntime-gpu, "
            f'then pip install "{wanted}"')
    elif not (cpu_ort or gpu_ort):
        requirement, why = onnxruntime_choice(facts.torch_cuda, facts.gpu_usable)
        plan.requirements.append(requirement)
        reasons.append(why)
    if not any(name in installed for name in OPENCV_DISTRIBUTIONS):
        plan.requirements.append("opencv-python-headless")
    # Installed versions win over the file's pins: what is there is what the host runs with.
    held = {**{canonical(k): v for k, v in facts.pins.items()},
            **{k: v for k, v in installed.items() if _VERSION.match(v)}}
    plan.constraints = [f"{name}=={version}" for name, version in sorted(held.items())]
    if plan.requirements:
        plan.explanation = (f"[Alchemy] installing {', '.join(plan.requirements)}"
                            + (f" ({'; '.join(reasons)})" if reasons else "")
                            + f" with the {len(held)} installed/pinned packages held at their versions")
    else:
        plan.explanation = "[Alchemy] all dependencies present; nothing installed"
    return plan
