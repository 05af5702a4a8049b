"""The "Train embedding" sub-tab (textual inversion), as the WebUI's Train tab for embeddings."""
from __future__ import annotations

import threading

from ..embeddings.library import EmbeddingLibrary
from ..embeddings.options import EmbeddingTrainOptions
from .context import UIContext
from .progress import JobRunner
from .train_tab import TrainTabSpec, build_train_tab, files_table
from .training_jobs import TrainRequest, train_embedding_file

PANEL = "train_embedding"


def embedding_train_options_class():
    """The options class this tab renders (the app uses it to size demo defaults)."""
    return EmbeddingTrainOptions


class EmbeddingListing:
    """The embeddings folder as the tab lists it, rescanned cheaply on each look."""

    def __init__(self, context: UIContext):
        self.context = context
        self._lock = threading.Lock()
        self._library: EmbeddingLibrary | None = None

    def library(self) -> EmbeddingLibrary:
        with self._lock:
            if self._library is None:
                self._library = EmbeddingLibrary(self.context.embeddings_dir)
            else:
                self._library.refresh()
            return self._library

    def names(self) -> list[str]:
        return self.library().names()

    def html(self) -> str:
        rows = []
        for entry in self.library().entries():
            step = entry.embedding.step if entry.embedding is not None else None
            details = f"skipped: {entry.error}" if entry.error else \
                f"{entry.kind}, {entry.embedding.num_vectors} vector(s)" + (f", step {step}" if step else "")
            rows.append((entry.name, details, str(entry.path)))
        return files_table(rows, f"alchemy_{PANEL}_list", f"No embeddings in {self.context.embeddings_dir} yet: "
                                                          "create one in the Create embedding tab.")


def build_train_embedding(runner: JobRunner, context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = EmbeddingListing(context)
    build_train_tab(runner, context, TrainTabSpec(
        panel=PANEL, noun="embedding", options_cls=EmbeddingTrainOptions, name_option="embedding_name",
        choices=listing.names, job=train_embedding_file, files_html=listing.html, make_request=TrainRequest))
