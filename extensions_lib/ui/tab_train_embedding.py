"""The "Train embedding" sub-tab (textual inversion), as the WebUI's Train tab for embeddings."""
from __future__ import annotations

from ..embeddings.library import EmbeddingLibrary
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from ..methods.registry import MethodSpec
from .train_tab import FolderListing, Row, TrainTabSpec, build_train_tab


def embedding_rows(library: EmbeddingLibrary) -> list[Row]:
    rows = []
    for entry in library.entries():
        step = entry.embedding.step if entry.embedding is not None else None
        details = f"skipped: {entry.error}" if entry.error else \
            f"{entry.kind}, {entry.embedding.num_vectors} vector(s)" + (f", step {step}" if step else "")
        rows.append((entry.name, details, str(entry.path)))
    return rows


def build_train_embedding(runner: JobRunner, context: UIContext, method: MethodSpec) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = FolderListing(EmbeddingLibrary, context.embeddings_dir, embedding_rows,
                            elem_id=f"alchemy_{method.train_panel}_list",
                            empty=f"No embeddings in {context.embeddings_dir} yet: create one in the Create "
                                  "embedding tab.")
    build_train_tab(runner, context, TrainTabSpec.of(method, listing))
