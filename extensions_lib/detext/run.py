"""`alchemy detext SRC DST`: every image of SRC with its text painted out, written under DST.

Sources are never written: DST must be another folder. An inpainted image is saved as PNG (lossless, so
the pixels outside the mask stay exactly the source's); images without text are copied as they are
when asked, and caption files follow their image.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from ..atomic import atomic_path
from ..checks.scan import scan_folder, sidecars
from ..errors import AlchemyError
from .inpaint import remove_text
from .options import DetextOptions


def _output_name(rel: Path, changed: bool) -> Path:
    return rel if not changed or rel.suffix.lower() == ".png" else rel.with_suffix(".png")


def model_inpainter(adapter, options: DetextOptions):
    from .sd_inpaint import SdInpainter, SdInpaintSettings

    return SdInpainter(adapter, SdInpaintSettings(prompt=options.prompt, strength=options.strength,
                                                  steps=options.steps))


def detext_folder(src, dst, detector, options: DetextOptions, *, inpainter=None, **kwargs):
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise AlchemyError("image folder not found", src, "give a folder that exists")
    if dst.resolve() == src.resolve() or (options.recursive and dst.resolve().is_relative_to(src.resolve())):
        raise AlchemyError("the output folder must not be the source folder (originals are never overwritten)", dst,
                           "give another folder")
    written: set[Path] = set()

    def check(image: Image.Image, path: Path) -> dict:
        rel = path.relative_to(src)
        result = remove_text(image, detector, passes=options.passes, dilate=options.dilate, method=options.method,
                             radius=options.radius, inpainter=inpainter)
        changed = result.passes > 0
        record = {"text_boxes": sum(len(b) for b in result.boxes), "passes": result.passes,
                  "masked_fraction": round(float((result.mask > 0).mean()), 5)}
        if not changed and not options.copy_unchanged:
            return record
        target = _output_name(rel, changed)
        if target in written:
            record["error"] = f"{target} was already written from another source; not written"
            return record
        written.add(target)
        out = dst / target
        out.parent.mkdir(parents=True, exist_ok=True)
        if changed:
            with atomic_path(out) as tmp:
                result.image.save(tmp, format="PNG")
            if options.save_masks:
                with atomic_path(out.with_suffix(".mask.png")) as tmp:
                    Image.fromarray(result.mask).save(tmp, format="PNG")
        else:
            shutil.copy2(path, out)
        for caption in sidecars(path):  # img.txt -> <out stem>.txt, img.png.txt -> <out name>.txt
            if caption.name.startswith(path.name + "."):
                name = out.name + caption.name[len(path.name):]
            else:
                name = out.stem + caption.suffix
            shutil.copy2(caption, out.parent / name)
        record["output"] = target.as_posix()
        return record

    dst.mkdir(parents=True, exist_ok=True)
    return scan_folder(src, check, lambda r: r["text_boxes"] > 0, recursive=options.recursive,
                       manifest=dst / "detext.jsonl", **kwargs)
