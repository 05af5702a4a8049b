"""Full DreamBooth fine-tune inside the (stand-in) WebUI, through the extension's job runner: the host's loaded
model is trained in place and given back exactly as it was (after success, error and interrupt) unless the
user keeps the trained weights; the checkpoint lands in the host's checkpoint folder with the keys the
standalone path writes, reloads bit for bit, and the host's checkpoint list is refreshed."""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train_fakes import make_folder
from webui_standin.harness import standin_host

LDM_SCHEDULE = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"}
"""The buffers ldm's ``DDPM.register_schedule`` keeps (restated from ldm, not from our code)."""
WEIGHT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def _extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


@pytest.fixture(params=["sd1", "sd2-v"])
def webui(request, tmp_path, tiny_checkpoint):
    with standin_host(tmp_path) as host:
        extension = _extension(host)
        host.load_model(tiny_checkpoint(request.param))
        make_folder(tmp_path / "inst", n=2, size=(64, 64))
        yield host, extension, request.param


def _options(tmp_path, **kw):
    from extensions_lib.dreambooth.options import DreamBoothTrainOptions

    values = dict(model_name="subj", mode="full", data_root=str(tmp_path / "inst"),
                  instance_prompt="a photo of sks thing", training_width=64, training_height=64, seed=1, steps=2,
                  learn_rate="1e-3", batch_size=1, save_every=0, create_image_every=0, write_csv_every=0,
                  save_resume_state=False, log_directory=str(tmp_path / "logs"))
    values.update(kw)
    return DreamBoothTrainOptions(**values)


def _run(extension, options, timeout=300):
    from extensions_lib.dreambooth.job import train_dreambooth_file
    from extensions_lib.jobs.training import TrainRequest

    runner = extension.runner
    return runner.wait(runner.start(train_dreambooth_file, TrainRequest(options, extension.context()),
                                    title="Training subj", panel="train_dreambooth"), timeout)


def _outputs(sd_model):
    """What generation computes: the UNet's prediction and a prompt's conditioning (fixed inputs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(["a photo of sks thing", "a dog"])
        return sd_model.apply_model(x, torch.tensor([10, 700]), cond), cond


def _same(before, after):
    return all(torch.equal(a, b) for a, b in zip(before, after))


def test_full_fine_tune_in_the_host_writes_a_listed_checkpoint_and_restores_the_model(webui, tmp_path):
    host, extension, family = webui
    sd_model = host.sd_models.model_data.sd_model
    before = _outputs(sd_model)
    grads = {n: p.requires_grad for n, p in sd_model.named_parameters()}
    p = _run(extension, _options(tmp_path, train_text_encoder=True, class_prompt="a photo of thing",
                                 class_dir=str(tmp_path / "cls"), num_class_images=1, class_steps=2,
                                 source_note="mine"))
    assert p.state == "done", p.error
    path = p.result.final_path
    assert path == host.data_dir / "models" / "Stable-diffusion" / "subj.safetensors"
    assert host.sd_models.model_data.sd_model is sd_model
    assert _same(before, _outputs(sd_model))  # bit for bit the model as loaded
    assert {n: p.requires_grad for n, p in sd_model.named_parameters()} == grads  # UNet left trainable, as ldm does
    # The host's checkpoint list was refreshed: the new file is a choice of its dropdown.
    assert any(info.filename == str(path) for info in host.sd_models.checkpoints_list.values())
    assert (path.with_suffix(".yaml")).is_file() == (family == "sd2-v")
    written = load_file(str(path))
    original = load_file(str(host.sd_models.model_data.sd_model.sd_checkpoint_info.filename))
    unet = [k for k in original if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(written[k], original[k]) for k in unet)  # trained...
    assert all(torch.equal(written[k], original[k]) for k in original if k.startswith("first_stage_model."))
    text = [k for k in original if k.startswith("cond_stage_model.") and written[k].is_floating_point()]
    assert any(not torch.equal(written[k], original[k]) for k in text)  # ...and the text encoder, as asked
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["alchemy_method"] == "dreambooth" and meta["alchemy_source_note"] == "mine"
    assert meta["alchemy_base_model_hash"] == sd_model.sd_checkpoint_info.shorthash
    assert json.loads(meta["alchemy_dreambooth_options"])["mode"] == "full"


def test_checkpoint_keys_match_the_standalone_output_and_reload_bit_for_bit(webui, tmp_path, tiny_checkpoint):
    from extensions_lib.backend.standalone import load_model
    from extensions_lib.dreambooth.method import train_dreambooth

    host, extension, family = webui
    sd_model = host.sd_models.model_data.sd_model
    p = _run(extension, _options(tmp_path, keep_trained_weights=True))
    assert p.state == "done", p.error
    host_file = load_file(str(p.result.final_path))
    original = load_file(str(tiny_checkpoint(family)))
    assert all(torch.equal(host_file[k], v) for k, v in original.items() if k.startswith("cond_stage_model."))
    standalone = train_dreambooth(load_model(tiny_checkpoint(family)),
                                  _options(tmp_path, steps=1, model_name="alone", checkpoints_dir=str(tmp_path / "s")))
    alone_file = load_file(str(standalone.final_path))
    weights = {k for k in host_file if k.startswith(WEIGHT_PREFIXES)}
    assert weights == {k for k in alone_file if k.startswith(WEIGHT_PREFIXES)}
    assert set(alone_file) - weights <= set(host_file) - weights <= LDM_SCHEDULE  # the host model's whole schedule
    assert all(host_file[k].shape == alone_file[k].shape and host_file[k].dtype == alone_file[k].dtype
               for k in alone_file)
    # Kept in the host: the trained weights there are exactly what the file reloads to in our backend.
    reloaded = load_model(p.result.final_path)
    host_unet = sd_model.model.diffusion_model.unet.state_dict()
    assert all(torch.equal(v, host_unet[k]) for k, v in reloaded.unet.state_dict().items())
    assert not torch.equal(reloaded.unet.conv_in.weight, load_model(tiny_checkpoint(family)).unet.conv_in.weight)
    # The host's own loader: hijack undone, load_state_dict (strict=False there; here every key must match).
    hijack = host.sd_hijack.model_hijack
    hijack.undo_hijack(sd_model)
    try:
        result = sd_model.load_state_dict(host_file, strict=False)
    finally:
        hijack.hijack(sd_model)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 77, reloaded.context_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded.predict(x, torch.tensor([500]), cond), sd_model.apply_model(x, torch.tensor([500]), cond))


def test_fp16_option_writes_half_weights_and_keeps_the_schedule_exact(webui, tmp_path):
    host, extension, family = webui
    p = _run(extension, _options(tmp_path, steps=1, save_fp16=True))
    assert p.state == "done", p.error
    written = load_file(str(p.result.final_path))
    sd_model = host.sd_models.model_data.sd_model
    assert written["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert torch.equal(written["alphas_cumprod"], sd_model.alphas_cumprod_original)


def test_interrupt_and_error_give_the_model_back_unchanged(webui, tmp_path):
    host, extension, family = webui
    sd_model = host.sd_models.model_data.sd_model
    before = _outputs(sd_model)
    runner = extension.runner
    from extensions_lib.dreambooth.job import train_dreambooth_file
    from extensions_lib.jobs.training import TrainRequest

    job = runner.start(train_dreambooth_file, TrainRequest(_options(tmp_path, steps=500), extension.context()),
                       title="Training subj", panel="train_dreambooth")
    end = time.time() + 120
    while runner.progress().step < 2:
        assert time.time() < end, "training did not start"
        time.sleep(0.01)
    host.shared.state.interrupt()  # the WebUI's Interrupt button
    p = runner.wait(job, 300)
    assert p.state == "cancelled" and 2 <= p.result.step < 500
    assert _same(before, _outputs(sd_model))
    # A run that fails when writing its file (the checkpoint folder cannot be made) also gives it back.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    host.sd_models.model_path = str(blocker / "sub")
    p = _run(extension, _options(tmp_path, steps=2))
    assert p.state == "failed"
    assert _same(before, _outputs(sd_model))


def test_original_weights_copy_lives_in_cpu_memory_in_its_own_dtype():
    from extensions_lib.dreambooth.method import OriginalWeights

    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
    layer.register_buffer("scale", torch.ones(2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    originals = OriginalWeights([layer])
    (module, saved), = originals.saved
    assert module is layer and set(saved) == {"weight", "bias"}  # parameters only, not buffers
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in saved.values())
    assert saved["weight"].data_ptr() != layer.weight.data_ptr()  # a copy, not a view of the live weight
    with torch.no_grad():
        layer.weight.add_(1)
        layer.bias.mul_(3)
    originals.restore()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.needs_gradio
def test_train_tab_has_no_template_dropdown_and_its_start_button_reads_the_options(tmp_path):
    """DreamBooth's prompts are the instance/class prompts: no template picker (Textual Inversion keeps its),
    and the start button's values line up with the options without one."""
    gr = pytest.importorskip("gradio")
    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
    from extensions_lib.ui import build_train_tabs

    seen = []

    def model():
        seen.append(True)
        raise RuntimeError("no model in this test")

    context = UIContext(model=model, embeddings_dir=tmp_path / "e", hypernetworks_dir=tmp_path / "h",
                        log_root=tmp_path, tagger_models_dir=tmp_path / "t", folders={"lora": tmp_path / "Lora"})
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_train_tabs(ThreadJobRunner(), context)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert "alchemy_train_dreambooth_template_file" not in by_id
    assert "alchemy_train_embedding_template_file" in by_id
    button = by_id["alchemy_train_dreambooth_start"]
    fn, inputs = next((fn.fn, [demo.blocks[i] for i in dep["inputs"]])
                      for dep, fn in zip(demo.dependencies, demo.fns) if button._id in dep["targets"])
    values = {b.elem_id: b.value for b in inputs}
    values.update({"alchemy_train_dreambooth_model_name": "subj", "alchemy_train_dreambooth_mode": "full",
                   "alchemy_train_dreambooth_instance_prompt": "a photo of sks thing"})
    text = fn(*[values[b.elem_id] for b in inputs])[0]
    assert seen and "no model in this test" in text  # the options were read and the job started


@pytest.mark.parametrize("keep", [False, True])
def test_a_half_precision_host_model_is_trained_in_float32_and_given_back_in_its_dtype(tmp_path, tiny_checkpoint, keep):
    """The WebUI holds its model in float16: the run trains float32 master weights (written to the file), and
    the model ends in its own dtype, bit for bit as loaded unless the trained weights are kept."""
    with standin_host(tmp_path) as host:
        extension = _extension(host)
        sd_model = host.load_model(tiny_checkpoint("sd1"))
        sd_model.model.to(torch.bfloat16)  # (bfloat16: CPU kernels; the host's float16 takes the same path)
        make_folder(tmp_path / "inst", n=2, size=(64, 64))
        before = {k: v.clone() for k, v in sd_model.model.state_dict().items()}
        p = _run(extension, _options(tmp_path, keep_trained_weights=keep))
        assert p.state == "done", p.error
        after = sd_model.model.state_dict()
        assert all(v.dtype == before[k].dtype for k, v in after.items())
        assert all(torch.equal(v, before[k]) for k, v in after.items()) != keep
        written = load_file(str(p.result.final_path))
        unet = {k: v for k, v in written.items() if k.startswith("model.diffusion_model.")}
        assert all(v.dtype == torch.float32 for v in unet.values())
        # float32 masters: the trained values are not all bfloat16 numbers (a bfloat16 weight would be)
        assert any(not torch.equal(v.to(torch.bfloat16).float(), v) for v in unet.values())


def test_full_mode_under_medvram_is_refused_with_the_fix_and_touches_nothing(tmp_path, tiny_checkpoint):
    with standin_host(tmp_path, medvram=True) as host:
        extension = _extension(host)
        host.load_model(tiny_checkpoint("sd1"))
        make_folder(tmp_path / "inst", n=2, size=(64, 64))
        p = _run(extension, _options(tmp_path))
        assert p.state == "failed" and "--medvram" in p.error and "lora" in p.error
        assert not (tmp_path / "logs").exists()
