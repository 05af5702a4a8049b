"""Face counts as dataset metadata: `alchemy faces DIR`."""
from __future__ import annotations

from pathlib import Path

from ..checks.scan import scan_folder
from .base import FaceDetector
from .options import FaceScanOptions


def scan_faces(folder, detector: FaceDetector, options: FaceScanOptions, **kwargs):
    def check(image, path):
        faces = detector.detect(image)
        return {"faces": len(faces), "boxes": [f.as_dict() for f in faces]}

    def flag(record):
        n = record["faces"]
        return n < options.min_faces or (options.max_faces > 0 and n > options.max_faces)

    manifest = options.manifest or Path(folder).expanduser() / "faces.jsonl"
    return scan_folder(folder, check, flag, recursive=options.recursive, manifest=manifest, action=options.action,
                       move_to=options.move_to, **kwargs)


def count_histogram(records) -> dict[int, int]:
    out: dict[int, int] = {}
    for record in records:
        if "faces" in record:
            out[record["faces"]] = out.get(record["faces"], 0) + 1
    return dict(sorted(out.items()))
