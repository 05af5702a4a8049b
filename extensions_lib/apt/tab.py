"""The "Train APT pair" sub-tab: the embeddings tab's layout, listing only positives whose
``-neg`` partner is in the folder."""
from __future__ import annotations

from pathlib import Path

from ..embeddings.library import EmbeddingLibrary
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner
from ..methods.registry import MethodSpec
from ..ui.tab_train_embedding import embedding_rows
from ..ui.train_tab import FolderListing, TrainTabSpec, build_train_tab
from .options import NEG_SUFFIX


class PairLibrary:
    """An embeddings folder seen as APT pairs: the names are the positives that have a negative."""

    def __init__(self, folder: Path):
        self.library = EmbeddingLibrary(folder)

    def refresh(self) -> None:
        self.library.refresh()

    def names(self) -> list[str]:
        names = set(self.library.names())
        return [n for n in self.library.names() if n + NEG_SUFFIX in names]

    def entries(self):
        paired = set(self.names())
        return [e for e in self.library.entries() if e.name in paired or
                (e.name.endswith(NEG_SUFFIX) and e.name[:-len(NEG_SUFFIX)] in paired)]


def build_train_apt(runner: JobRunner, context: UIContext, method: MethodSpec) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab."""
    listing = FolderListing(PairLibrary, context.embeddings_dir, embedding_rows,
                            elem_id=f"alchemy_{method.train_panel}_list",
                            empty=f"No APT pairs (<name> with <name>{NEG_SUFFIX}) in {context.embeddings_dir} yet: "
                                  "create one in the Create APT pair tab.")
    build_train_tab(runner, context, TrainTabSpec.of(method, listing))
