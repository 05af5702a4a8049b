"""Textual inversion in the method registry (:mod:`extensions_lib.methods.registry`)."""
from __future__ import annotations

from ..methods.registry import MethodSpec
from .options import CreateEmbeddingOptions, EmbeddingTrainOptions

METHOD = MethodSpec(
    key="embedding", title="Embedding", noun="embedding",
    train_options=EmbeddingTrainOptions, name_option="embedding_name",
    folder="embeddings", folder_option="embeddings_dir",
    train_job="extensions_lib.jobs.training:train_embedding_file",
    train_tab="extensions_lib.ui.tab_train_embedding:build_train_embedding",
    cli="extensions_lib.commands.embedding",
    create_options=CreateEmbeddingOptions, create_needs_model=True,
    create_job="extensions_lib.jobs.training:create_embedding_file",
)
