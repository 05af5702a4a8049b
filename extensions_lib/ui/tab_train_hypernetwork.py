"""The "Train hypernetwork" sub-tab, as the WebUI's Train tab for hypernetworks."""
from __future__ import annotations

from ..hypernetworks.library import HypernetworkLibrary
from ..hypernetworks.train_options import HypernetworkTrainOptions
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from .train_tab import FolderListing, Row, TrainTabSpec, build_train_tab
from ..jobs.training import train_hypernetwork_file

PANEL = "train_hypernetwork"


def hypernetwork_train_options_class():
    """The options class this tab renders (the app uses it to size demo defaults)."""
    return HypernetworkTrainOptions


def hypernetwork_rows(library: HypernetworkLibrary) -> list[Row]:
    rows = [(e.name, "context widths " + ", ".join(map(str, e.widths)), str(e.path)) for e in library.entries()]
    return rows + [(e.name, f"skipped: {e.error}", str(e.path)) for e in library.skipped]


def build_train_hypernetwork(runner: JobRunner, context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = FolderListing(HypernetworkLibrary, context.hypernetworks_dir, hypernetwork_rows,
                            elem_id=f"alchemy_{PANEL}_list",
                            empty=f"No hypernetworks in {context.hypernetworks_dir} yet: create one in the Create "
                                  "hypernetwork tab.")
    build_train_tab(runner, context, TrainTabSpec(
        panel=PANEL, noun="hypernetwork", options_cls=HypernetworkTrainOptions, name_option="hypernetwork_name",
        job=train_hypernetwork_file, listing=listing))
