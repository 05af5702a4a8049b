"""WD14-family taggers (SmilingWolf v1/v2/v3, large, EVA02 and compatible exports) via onnxruntime.

A model folder holds `model.onnx` + `selected_tags.csv` (or exactly one `.onnx` and one `.csv`).
Everything about the tensor is read from the model: the input name, the square input size, and
whether the batch dimension is free (symbolic) or fixed. Fixed-batch models (most v2 exports) are
fed exactly their batch size per call, because feeding them more errors and re-exporting them
changes results.

On a CPU the cores are split between two concurrent single-image runs instead of one run spread
over every core (:func:`cpu_split`): the work between the synchronisation points of one run is
uneven, and a core taken away for a moment (the decoder threads, another program) stalls every
other core at the next one. Two independent runs lose neither way. On 2 cores (ConvNeXt-Base
stand-in, bench/bench_tagger.py) they took 348 instead of 362 ms per image with the machine
otherwise quiet, and about 590 instead of 930 while other programs kept a core busy. The numbers are
the same: each run is the same graph with the same kernels.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import AlchemyError
from .base import make_model_id
from .labels import Labels, read_selected_tags
from .options import WD14_THRESHOLDS
from .preprocess import wd14_input
from .providers import ProviderPlan, check_session, plan_providers, preload_cuda_libraries

MIN_ORT_FOR_V3 = "1.17"


def find_wd14_files(folder: str | Path) -> tuple[Path, Path] | None:
    """(model.onnx, selected_tags.csv) in `folder`, or None when it is not a WD14 folder."""
    folder = Path(folder)
    onnx = folder / "model.onnx"
    csv = folder / "selected_tags.csv"
    if not onnx.is_file():
        found = sorted(folder.glob("*.onnx"))
        if len(found) != 1:
            return None
        onnx = found[0]
    if not csv.is_file():
        found = sorted(folder.glob("*.csv"))
        if len(found) != 1:
            return None
        csv = found[0]
    return onnx, csv


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_split(cores: int, intra_threads: int = 0) -> tuple[int, int]:
    """(concurrent runs, threads per run) for a CPU session: two runs of half the cores each (an odd
    core shared); an explicit thread count means one run with that many threads."""
    if intra_threads:
        return 1, intra_threads
    runs = 2 if cores >= 2 else 1
    return runs, -(-cores // runs)


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class Wd14Tagger:
    """One loaded WD14 ONNX model (see the module docstring)."""

    kind = "wd14"
    default_thresholds = WD14_THRESHOLDS

    def __init__(self, folder: str | Path, *, device: str = "auto", device_id: int = 0,
                 intra_threads: int = 0, report: Callable[[str], None] | None = None):
        folder = Path(folder)
        files = find_wd14_files(folder)
        if files is None:
            raise AlchemyError("not a WD14 tagger folder", folder,
                               "put the model's model.onnx and selected_tags.csv in it")
        self.model_path, self.tags_path = files
        self.name = folder.name
        self.labels: Labels = read_selected_tags(self.tags_path)
        self.model_id = make_model_id(self.kind, [self.model_path, self.tags_path])
        self.plan: ProviderPlan = plan_providers(device, device_id)
        self._report = report or (lambda line: None)
        for line in self.plan.notes:
            self._report(line)
        self.parallel_runs = 1  # predict() calls that may run at once (set with the session's threads)
        self.session = self._open_session(intra_threads)
        self._read_signature()

    def _open_session(self, intra_threads: int):
        import onnxruntime as ort

        if self.plan.uses_cuda:
            preload_cuda_libraries(self._report)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.plan.uses_cuda:
            if intra_threads:
                opts.intra_op_num_threads = intra_threads
        else:
            self.parallel_runs, opts.intra_op_num_threads = cpu_split(available_cores(), intra_threads)
        # Idle inference threads sleep instead of spinning, leaving the CPU to the decoder threads.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=self.plan.providers)
        except Exception as exc:
            text = str(exc)
            fix = "download model.onnx again; the file may be incomplete"
            if "opset" in text.lower():
                fix = f"this model needs a newer onnxruntime (>= {MIN_ORT_FOR_V3} for v3 taggers): pip install -U " \
                      f"onnxruntime (or onnxruntime-gpu)"
            raise AlchemyError(f"onnxruntime {ort.__version__} cannot load the model: {text.splitlines()[0]}",
                               self.model_path, fix) from None
        for line in check_session(session, self.plan):
            self._report(line)
        return session

    def _read_signature(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise AlchemyError(f"model has {len(inputs)} inputs; a WD14 tagger has one image input", self.model_path,
                               "use a WD14-style ONNX export (one NHWC image input)")
        inp = inputs[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or _dim(shape[1]) is None or shape[1] != shape[2]:
            raise AlchemyError(f"model input {inp.name} has shape {shape}; expected [batch, size, size, 3] (NHWC)",
                               self.model_path, "use a WD14-style ONNX export (NHWC BGR 0-255 input)")
        self.input_name = inp.name
        self.input_size = int(shape[1])
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.fixed_batch = _dim(shape[0])
        n = len(self.labels)
        outputs = self.session.get_outputs()
        matching = [o for o in outputs if o.shape and o.shape[-1] == n]
        if not matching:
            shapes = ", ".join(f"{o.name}{list(o.shape)}" for o in outputs)
            raise AlchemyError(f"no model output has {n} scores, one per row of {self.tags_path.name} "
                               f"(outputs: {shapes})", self.model_path,
                               "use the selected_tags.csv that belongs to this model.onnx")
        self.output_name = matching[0].name

    @property
    def on_gpu(self) -> bool:
        return self.session is not None and self.session.get_providers()[0] != "CPUExecutionProvider"

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def prepare(self, image: Image.Image) -> np.ndarray:
        return wd14_input(image, self.input_size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) prepared images -> (n, labels) probabilities, in chunks the model accepts."""
        if self.session is None:
            raise AlchemyError("the tagger was unloaded", self.model_path, "load it again")
        batch = np.asarray(batch, dtype=self.input_dtype)
        step = self.fixed_batch or len(batch)
        rows = []
        for start in range(0, len(batch), max(step, 1)):
            chunk = batch[start:start + step]
            real = len(chunk)
            if self.fixed_batch and real < self.fixed_batch:  # pad a short last chunk, drop its rows after
                pad = np.zeros((self.fixed_batch - real,) + chunk.shape[1:], dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            rows.append(np.asarray(out[:real], dtype=np.float32))
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)), np.float32)

    def unload(self) -> None:
        """Drop the session so onnxruntime frees its memory (CPU arena and GPU buffers)."""
        self.session = None
        gc.collect()
