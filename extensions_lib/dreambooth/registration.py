"""DreamBooth in the method registry (:mod:`extensions_lib.methods.registry`)."""
from __future__ import annotations

from ..methods.registry import MethodSpec
from .options import DreamBoothTrainOptions

METHOD = MethodSpec(
    key="dreambooth", title="DreamBooth", noun="DreamBooth model",
    train_options=DreamBoothTrainOptions, name_option="model_name",
    folder="lora", folder_option="lora_dir",
    train_job="extensions_lib.dreambooth.job:train_dreambooth_file",
    train_tab="extensions_lib.dreambooth.tab:build_train_dreambooth",
    cli="extensions_lib.commands.dreambooth",
)
