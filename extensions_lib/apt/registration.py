"""APT in the method registry (:mod:`extensions_lib.methods.registry`): the Create and Train sub-tabs, ``alchemy
apt create|train``, the API routes and the saved training settings all come from this one declaration."""
from __future__ import annotations

from ..methods.registry import MethodSpec
from .options import AptCreateOptions, AptTrainOptions

METHOD = MethodSpec(
    key="apt", title="APT", noun="APT pair",
    train_options=AptTrainOptions, name_option="embedding_name",
    folder="embeddings", folder_option="embeddings_dir",
    train_job="extensions_lib.apt.jobs:train_apt_file",
    train_tab="extensions_lib.apt.tab:build_train_apt",
    cli="extensions_lib.apt.commands",
    create_options=AptCreateOptions, create_needs_model=True,
    create_job="extensions_lib.apt.jobs:create_apt_files",
)
