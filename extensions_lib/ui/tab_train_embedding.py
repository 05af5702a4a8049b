"""The "Train embedding" sub-tab (textual inversion), as the WebUI's Train tab for embeddings."""
from __future__ import annotations

from ..embeddings.library import EmbeddingLibrary
from ..embeddings.options import EmbeddingTrainOptions
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from .train_tab import FolderListing, Row, TrainTabSpec, build_train_tab
from ..jobs.training import train_embedding_file

PANEL = "train_embedding"


def embedding_train_options_class():
    """The options class this tab renders (the app uses it to size demo defaults)."""
    return EmbeddingTrainOptions


def embedding_rows(library: EmbeddingLibrary) -> list[Row]:
    rows = []
    for entry in library.entries():
        step = entry.embedding.step if entry.embedding is not None else None
        details = f"skipped: {entry.error}" if entry.error else \
            f"{entry.kind}, {entry.embedding.num_vectors} vector(s)" + (f", step {step}" if step else "")
        rows.append((entry.name, details, str(entry.path)))
    return rows


def build_train_embedding(runner: JobRunner, context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = FolderListing(EmbeddingLibrary, context.embeddings_dir, embedding_rows, elem_id=f"alchemy_{PANEL}_list",
                            empty=f"No embeddings in {context.embeddings_dir} yet: create one in the Create "
                                  "embedding tab.")
    build_train_tab(runner, context, TrainTabSpec(
        panel=PANEL, noun="embedding", options_cls=EmbeddingTrainOptions, name_option="embedding_name",
        job=train_embedding_file, listing=listing))
