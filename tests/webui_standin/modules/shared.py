"""Stand-in for ``modules/shared.py`` (v1.10.1): ``cmd_opts``, ``opts``, ``state``, ``sd_model`` (a module
property that loads on first access), hypernetwork lists, and the option helpers re-exported."""
from __future__ import annotations

import argparse
import os
import sys

from modules import options, shared_state

OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML
options_section = options.options_section

data_path = os.environ.get("STANDIN_DATA_PATH", os.getcwd())
models_path = os.path.join(data_path, "models")

cmd_opts = argparse.Namespace(
    data_dir=data_path, models_dir=None, embeddings_dir=os.path.join(data_path, "embeddings"),
    hypernetwork_dir=os.path.join(models_path, "hypernetworks"), ckpt_dir=None, ckpt=None,
    textual_inversion_templates_dir=os.path.join(data_path, "textual_inversion_templates"),
    medvram=False, medvram_sdxl=False, lowvram=False, api=False, api_auth=None, nowebui=False, no_half=False,
    disable_extension_access=False, freeze_settings=False, ui_debug_mode=False,
)

options_templates = {}
options_templates.update(options_section(('sd', "Stable Diffusion", "sd"), {
    "sd_hypernetwork": OptionInfo("None", "Add hypernetwork to prompt"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "emphasis": OptionInfo("Original", "Emphasis mode"),
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
    "textual_inversion_add_hashes_to_infotext": OptionInfo(True, "Add Textual Inversion hashes to infotext"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time"),
}))
options_templates.update(options_section(('extra_networks', "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
}))
options_templates.update(options_section(('training', "Training", "training"), {
    "unload_models_when_training": OptionInfo(False, "Move VAE and CLIP to RAM when training if possible. Saves VRAM."),
    "save_optimizer_state": OptionInfo(False, "Saves Optimizer state as separate *.optim file."),
    "save_training_settings_to_txt": OptionInfo(True, "Save textual inversion and hypernet settings to a text file whenever training starts."),
    "training_write_csv_every": OptionInfo(500, "Save an csv containing the loss to log directory every N steps, 0 to disable"),
}))

restricted_opts = set()
opts = options.Options(options_templates, restricted_opts)
state = shared_state.State()

hypernetworks = {}
loaded_hypernetworks = []
parallel_processing_allowed = True
demo = None


def reload_hypernetworks():
    from modules.hypernetworks import hypernetwork
    global hypernetworks
    hypernetworks = hypernetwork.list_hypernetworks(cmd_opts.hypernetwork_dir)


class Shared(sys.modules[__name__].__class__):
    """Makes ``shared.sd_model`` a property, as the host does."""

    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
