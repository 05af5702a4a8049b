"""The "Train DreamBooth model" sub-tab: the generic train tab over the LoRA folder."""
from __future__ import annotations

from ..errors import AlchemyError
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from ..methods.registry import MethodSpec
from ..ui.train_tab import FolderListing, Row, TrainTabSpec, build_train_tab
from ..ui.widgets import unsupported_note
from .library import LoraLibrary


def lora_rows(library: LoraLibrary) -> list[Row]:
    return [(e.name, f"skipped: {e.error}" if e.error else f"{e.layers} LoRA layers", str(e.path))
            for e in library.entries()]


def build_train_dreambooth(runner: JobRunner, context: UIContext, method: MethodSpec) -> None:
    try:
        folder = context.folder(method.folder)
    except AlchemyError as exc:  # a host that names no Lora folder: say so instead of a broken tab
        unsupported_note(str(exc))
        return
    listing = FolderListing(LoraLibrary, folder, lora_rows, elem_id=f"alchemy_{method.train_panel}_list",
                            empty=f"No LoRA files in {folder} yet: name a new one above.")
    build_train_tab(runner, context, TrainTabSpec.of(method, listing))
