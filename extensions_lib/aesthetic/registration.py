"""Aesthetic Gradients in the method registry: a create-only method (no training loop to register)."""
from __future__ import annotations

from ..methods.registry import CreateOnlySpec
from .options import CreateOptions

METHOD = CreateOnlySpec(
    key="aesthetic", title="Aesthetic embedding", noun="aesthetic embedding",
    folder="aesthetic_embeddings", create_options=CreateOptions,
    create_job="extensions_lib.aesthetic.jobs:create_aesthetic_file",
    cli="extensions_lib.commands.aesthetic",
)
