"""Shared fixtures. Tiny checkpoints are built once per test session (seconds on CPU, no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Tiny models are dominated by per-op overhead: one thread avoids oversubscribing the two cores
# (about 20x faster per forward here) and keeps float results independent of the machine's core count.
torch.set_num_threads(int(os.environ.get("ALCHEMY_TEST_THREADS", "1")))

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
WEBUI_FILES = REFERENCE_DIR / "webui-files"


@pytest.fixture(scope="session")
def webui_files() -> Path:
    """Genuine files written by a real WebUI v1.10.1 (see shared/reference/webui-files/README.md)."""
    if not WEBUI_FILES.is_dir():
        pytest.skip(f"reference fixtures not found at {WEBUI_FILES}")
    return WEBUI_FILES


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family="sd1"|"sd2"|"sd2-v", fmt="safetensors"|"ckpt") -> Path, cached per session."""
    cache: dict[tuple[str, str], Path] = {}

    def make(family: str = "sd1", fmt: str = "safetensors") -> Path:
        key = (family, fmt)
        if key not in cache:
            from extensions_lib.backend.tiny import make_tiny_checkpoint

            out = tmp_path_factory.mktemp(f"tiny-{family}") / f"tiny-{family}.{fmt}"
            cache[key] = make_tiny_checkpoint(out, family=family)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """tiny_model(family) -> a loaded StandaloneModel (float32, CPU), cached per session.

    Shared between tests: a test that patches it must undo its patch (use try/finally).
    """
    cache: dict[str, object] = {}

    def load(family: str = "sd1"):
        if family not in cache:
            from extensions_lib.backend.standalone import load_model

            cache[family] = load_model(tiny_checkpoint(family))
        return cache[family]

    return load
