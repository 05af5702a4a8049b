"""Which onnxruntime execution providers to ask for, and what to tell the user about it.

Three things go wrong in practice (see the tagger reference notes, section 4.3): CUDA is silently not
used (missing CUDA/cuDNN libraries, or the CPU wheel installed), both `onnxruntime` and
`onnxruntime-gpu` are installed and the CPU one shadows the GPU one, and v3 models need
onnxruntime >= 1.17. Every one of these is said out loud, with the fix.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Callable, Sequence

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon",
                     "onnxruntime-openvino", "ort-nightly", "ort-nightly-gpu")
FIX_BOTH_INSTALLED = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
                      "(both wheels provide the same module; the one installed last wins)")
FIX_CPU_ONLY = "for GPU tagging: pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


@dataclass
class ProviderPlan:
    """Providers to pass to `InferenceSession`, plus the lines to show the user."""

    providers: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def uses_cuda(self) -> bool:
        return any((p[0] if isinstance(p, tuple) else p) == CUDA for p in self.providers)


def installed_onnxruntime() -> dict[str, str]:
    """{distribution name: version} of every onnxruntime wheel in this environment."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def plan_providers(device: str = "auto", device_id: int = 0, *, available: Sequence[str] | None = None,
                   installed: dict[str, str] | None = None) -> ProviderPlan:
    """Decide the provider list. `available`/`installed` default to this environment's (tests inject)."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    if installed is None:
        installed = installed_onnxruntime()
    plan = ProviderPlan()
    if "onnxruntime" in installed and len(installed) > 1:
        others = ", ".join(f"{k} {v}" for k, v in installed.items() if k != "onnxruntime")
        plan.notes.append(f"onnxruntime: both onnxruntime {installed['onnxruntime']} and {others} are "
                          f"installed; fix: {FIX_BOTH_INSTALLED}")
    wheels = ", ".join(f"{k} {v}" for k, v in installed.items()) or "unknown"
    if device in ("auto", "cuda") and CUDA in available:
        plan.providers.append((CUDA, {"device_id": int(device_id), "arena_extend_strategy": "kSameAsRequested"}))
    elif device == "cuda":
        plan.notes.append(f"onnxruntime: CUDA was requested but this onnxruntime ({wheels}) has no "
                          f"CUDAExecutionProvider; running on CPU ({FIX_CPU_ONLY})")
    elif device == "auto":
        plan.notes.append(f"onnxruntime: running on CPU (no CUDAExecutionProvider in {wheels})")
    plan.providers.append(CPU)
    return plan


def check_session(session, plan: ProviderPlan) -> list[str]:
    """Lines to show when a session did not get the providers the plan asked for (silent fallback)."""
    got = list(session.get_providers())
    if plan.uses_cuda and CUDA not in got:
        return ["onnxruntime: CUDAExecutionProvider failed to start (CUDA/cuDNN libraries missing or of the "
                "wrong version); running on CPU. Fix: install the onnxruntime-gpu build matching your CUDA, or "
                "import torch first so its CUDA libraries are loaded"]
    return []


def preload_cuda_libraries(report: Callable[[str], None] | None = None) -> None:
    """Let onnxruntime-gpu reuse torch's CUDA/cuDNN (onnxruntime >= 1.21 offers `preload_dlls`)."""
    import onnxruntime

    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:
        return
    try:
        import torch  # noqa: F401  (loads its CUDA libraries first)

        preload()
    except Exception as exc:  # best effort: the session start reports a real failure
        if report:
            report(f"onnxruntime: preload_dlls failed ({exc})")
