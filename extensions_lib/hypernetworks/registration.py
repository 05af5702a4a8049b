"""Hypernetworks in the method registry (:mod:`extensions_lib.methods.registry`)."""
from __future__ import annotations

from ..methods.registry import MethodSpec
from .options import CreateHypernetworkOptions
from .train_options import HypernetworkTrainOptions

METHOD = MethodSpec(
    key="hypernetwork", title="Hypernetwork", noun="hypernetwork",
    train_options=HypernetworkTrainOptions, name_option="hypernetwork_name",
    folder="hypernetworks", folder_option="hypernetwork_dir",
    train_job="extensions_lib.jobs.training:train_hypernetwork_file",
    train_tab="extensions_lib.ui.tab_train_hypernetwork:build_train_hypernetwork",
    cli="extensions_lib.commands.hypernetwork",
    create_options=CreateHypernetworkOptions,
    create_job="extensions_lib.jobs.training:create_hypernetwork_file",
)
