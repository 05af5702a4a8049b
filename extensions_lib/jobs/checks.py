"""The faces / watermark / text-removal folder jobs (``fn(request, job)`` for a JobRunner), shared by the HTTP
API and any tab: the same functions `alchemy faces|watermark|detext` run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..detext.options import DetextOptions
from ..faces.options import FaceModelOptions, FaceScanOptions
from ..watermark.options import WatermarkOptions
from .progress import JobContext


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _report(job: JobContext):
    return lambda line: job.update(message=line)


def _done(job: JobContext, summary, what: str):
    job.update(message="\n".join(summary.lines(what)))
    return summary


@dataclass
class FacesRequest:
    folder: Path
    model: FaceModelOptions
    scan: FaceScanOptions


def faces_folder(request: FacesRequest, job: JobContext):
    from ..faces.load import load_detector
    from ..faces.scan import scan_faces

    m = request.model
    detector = load_detector(m.detector, model=m.model or None, models_dir=m.models_dir, download=m.download,
                             threshold=m.threshold, report=_report(job))
    summary = scan_faces(request.folder, detector, request.scan, progress=job.counter("image"),
                         should_stop=job.should_stop)
    return _done(job, summary, "flagged")


@dataclass
class WatermarkRequest:
    folder: Path
    options: WatermarkOptions


def watermark_folder(request: WatermarkRequest, job: JobContext):
    from ..watermark.model import WatermarkClassifier
    from ..watermark.scan import DEFAULT_MODEL, scan_watermarks

    classifier = WatermarkClassifier(request.options.model or DEFAULT_MODEL, device=request.options.device)
    try:
        summary = scan_watermarks(request.folder, classifier, request.options, progress=job.counter("image"),
                                  should_stop=job.should_stop)
    finally:
        classifier.unload()
    return _done(job, summary, f"scored >= {request.options.threshold:g}")


@dataclass
class DetextRequest:
    source: Path
    destination: Path
    options: DetextOptions
    context: Any = None  # a UIContext: its loaded model inpaints with --inpainter model


def detext_folder(request: DetextRequest, job: JobContext):
    from ..detext.detector import DbTextDetector, find_model
    from ..detext.run import detext_folder as run

    o = request.options
    detector = DbTextDetector(find_model(o.model or None), device=o.device, report=_report(job),
                              box_thresh=o.box_threshold)
    inpainter = None
    if o.inpainter == "model":
        from ..detext.run import model_inpainter

        if o.ckpt is not None:
            from ..backend.standalone import load_model

            adapter = load_model(o.ckpt, device="cuda" if o.device != "cpu" and _cuda() else "cpu")
        else:
            adapter = request.context.model()  # the WebUI's loaded checkpoint (says so when none is)
        inpainter = model_inpainter(adapter, o)
    summary = run(request.source, request.destination, detector, o, inpainter=inpainter,
                  progress=job.counter("image"), should_stop=job.should_stop)
    return _done(job, summary, "had text")
