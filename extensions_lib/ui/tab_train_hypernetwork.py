"""The "Train hypernetwork" sub-tab, as the WebUI's Train tab for hypernetworks."""
from __future__ import annotations

from ..hypernetworks.library import HypernetworkLibrary
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from ..methods.registry import MethodSpec
from .train_tab import FolderListing, Row, TrainTabSpec, build_train_tab


def hypernetwork_rows(library: HypernetworkLibrary) -> list[Row]:
    rows = [(e.name, "context widths " + ", ".join(map(str, e.widths)), str(e.path)) for e in library.entries()]
    return rows + [(e.name, f"skipped: {e.error}", str(e.path)) for e in library.skipped]


def build_train_hypernetwork(runner: JobRunner, context: UIContext, method: MethodSpec) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = FolderListing(HypernetworkLibrary, context.hypernetworks_dir, hypernetwork_rows,
                            elem_id=f"alchemy_{method.train_panel}_list",
                            empty=f"No hypernetworks in {context.hypernetworks_dir} yet: create one in the Create "
                                  "hypernetwork tab.")
    build_train_tab(runner, context, TrainTabSpec.of(method, listing))
