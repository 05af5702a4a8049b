"""DreamBooth's one registration gives the CLI command (tested in test_dreambooth_train), its settings keys,
its API route and its Train sub-tab over the Lora folder."""
from __future__ import annotations

import pytest

from extensions_lib.dreambooth.options import DreamBoothTrainOptions
from extensions_lib.methods import registry


def test_settings_keys_of_its_own_defaults():
    from extensions_lib.host.settings import training_keys

    keys = training_keys()[DreamBoothTrainOptions]
    assert keys["learn_rate"] == "alchemy_train_dreambooth_learn_rate"   # 1e-4, not the embedding's 0.005
    assert keys["log_directory"] == "alchemy_train_dreambooth_log_directory"
    assert keys["batch_size"] == "alchemy_train_batch_size"              # same default: the shared key


def test_api_route_runs_the_dreambooth_job(tmp_path, monkeypatch):
    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.training import for_context

    spec = registry.find("dreambooth")
    assert registry.resolve(spec.train_job).__name__ == "train_dreambooth_file"
    context = UIContext(embeddings_dir=tmp_path / "e", hypernetworks_dir=tmp_path / "h", log_root=tmp_path,
                        tagger_models_dir=tmp_path / "t", folders={"lora": tmp_path / "Lora"})
    options = for_context(DreamBoothTrainOptions(model_name="x", lora_dir="elsewhere"), context)
    assert options.lora_dir == str(tmp_path / "Lora") and options.seed >= 0  # the host's folder, seed resolved


@pytest.mark.needs_gradio
def test_train_tab_lists_the_lora_folder_and_renders_the_options(tmp_path):
    gr = pytest.importorskip("gradio")
    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
    from extensions_lib.ui import build_train_tabs

    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "broken.safetensors").write_bytes(b"\xff" * 16)
    context = UIContext(embeddings_dir=tmp_path / "e", hypernetworks_dir=tmp_path / "h", log_root=tmp_path,
                        tagger_models_dir=tmp_path / "t", folders={"lora": tmp_path / "Lora"})
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_train_tabs(ThreadJobRunner(), context)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for name in ("instance_prompt", "class_prompt", "prior_loss_weight", "lora_rank", "mode", "num_class_images"):
        assert f"alchemy_train_dreambooth_{name}" in by_id
    assert "skipped" in by_id["alchemy_train_dreambooth_files"].value  # a bad file is listed with its reason
