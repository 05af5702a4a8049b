"""The "Create embedding" sub-tab, as the WebUI's (name, initialization text, vectors, overwrite)."""
from __future__ import annotations

from ..embeddings.options import CreateEmbeddingOptions
from ..jobs.context import UIContext
from .create_tab import build_create_tab
from ..jobs.progress import JobRunner
from ..jobs.training import CreateEmbeddingRequest, create_embedding_file
from .widgets import outcome, run_and_report

PANEL = "create_embedding"


def build_create_embedding(runner: JobRunner, context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab. Creating reads the model's token
    vectors, so it runs as a job (never while training uses the model)."""
    def create(options: CreateEmbeddingOptions) -> str:
        p = run_and_report(runner, create_embedding_file, CreateEmbeddingRequest(options, context),
                           title=f"Creating embedding {options.name}", panel=PANEL)
        return f"Created: {p.result}" if p.state == "done" else outcome(p)

    build_create_tab(context, panel=PANEL, noun="embedding", options_cls=CreateEmbeddingOptions, create=create,
                     progress=True)
