"""The "Train hypernetwork" sub-tab, as the WebUI's Train tab for hypernetworks."""
from __future__ import annotations

import threading

from ..hypernetworks.library import HypernetworkLibrary
from ..hypernetworks.train_options import HypernetworkTrainOptions
from .context import UIContext
from .progress import JobRunner
from .train_tab import TrainTabSpec, build_train_tab, files_table
from .training_jobs import TrainRequest, train_hypernetwork_file

PANEL = "train_hypernetwork"


def hypernetwork_train_options_class():
    """The options class this tab renders (the app uses it to size demo defaults)."""
    return HypernetworkTrainOptions


class HypernetworkListing:
    """The hypernetworks folder as the tab lists it, rescanned on each look (changed files only)."""

    def __init__(self, context: UIContext):
        self.context = context
        self._lock = threading.Lock()
        self._library: HypernetworkLibrary | None = None

    def library(self) -> HypernetworkLibrary:
        with self._lock:
            if self._library is None:
                self._library = HypernetworkLibrary(self.context.hypernetworks_dir)
            else:
                self._library.refresh()
            return self._library

    def names(self) -> list[str]:
        return self.library().names()

    def html(self) -> str:
        library = self.library()
        rows = [(e.name, "context widths " + ", ".join(map(str, e.widths)), str(e.path)) for e in library.entries()]
        rows += [(e.name, f"skipped: {e.error}", str(e.path)) for e in library.skipped]
        return files_table(rows, f"alchemy_{PANEL}_list", f"No hypernetworks in {self.context.hypernetworks_dir} "
                                                          "yet: create one in the Create hypernetwork tab.")


def build_train_hypernetwork(runner: JobRunner, context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = HypernetworkListing(context)
    build_train_tab(runner, context, TrainTabSpec(
        panel=PANEL, noun="hypernetwork", options_cls=HypernetworkTrainOptions, name_option="hypernetwork_name",
        choices=listing.names, job=train_hypernetwork_file, files_html=listing.html, make_request=TrainRequest))
