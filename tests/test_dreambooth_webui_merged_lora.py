"""DreamBooth inside the (stand-in) WebUI after a generation with ``<lora:...>``: the built-in Lora extension has
merged that LoRA into the model's weights (CPU backups on each layer) and keeps it loaded until the next
prompt. Training must start from the checkpoint's own weights, the layers must not re-merge during the run,
and a later generation must apply the LoRA to the weights the model then holds (the kept trained ones), never
put a stale backup over them. Expected weights come from the restated loader (``host_lora_reference``)."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from host_lora_reference import load_network, names_of_model, weight_changes
from train_fakes import make_folder
from webui_standin.harness import standin_host

RANK = 2


def _extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


def _lora_file(sd_model, path) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA over every UNet Linear and the text encoder (SD1: its Linears; SD2: OpenCLIP's
    attentions), large enough that a merge shows."""
    names = names_of_model(sd_model.cond_stage_model, sd_model.model)
    g = torch.Generator().manual_seed(7)
    tensors = {}

    def add(key, out_dim, in_dim):
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, in_dim, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, RANK, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(float(RANK))

    for name, layer in names.items():
        if layer.kind == "linear" and name.startswith("diffusion_model_"):
            add("lora_unet_" + name[len("diffusion_model_"):], *layer.shape)  # the loader's lora_unet fallback
        elif layer.kind == "linear" and name.startswith("transformer_text_model_"):
            add("lora_te1_text_model" + name[len("transformer_text_model"):], *layer.shape)
        elif layer.kind == "mha" and (m := re.fullmatch(r"model_transformer_resblocks_(\d+)_attn", name)):
            width = layer.shape[1]
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                add(f"lora_te_text_model_encoder_layers_{m.group(1)}_self_attn_{proj}", width, width)
    save_file(tensors, str(path))
    return tensors


def _params(sd_model):
    return {n: p.detach().clone() for n, p in sd_model.named_parameters()}


def _generate(sd_model):
    """What a generation runs through (each layer's forward, where the extension merges)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(["a photo of sks thing", "a dog"])
        return sd_model.apply_model(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), cond), cond


def _merged_expected(sd_model, base: dict[str, torch.Tensor], tensors) -> dict[str, torch.Tensor]:
    """`base` (parameters by name) with the LoRA applied at 1 by the restated rules, in the layers that ran
    (the extension merges at a layer's forward; SD2's last text layer, skipped by its penultimate output, never
    runs)."""
    names = names_of_model(sd_model.cond_stage_model, sd_model.model)
    matched, _ = load_network(tensors, names)
    changes, errors = weight_changes(matched, names)
    assert not errors
    by_id = {id(p): n for n, p in sd_model.named_parameters()}
    out = dict(base)
    for (name, param), delta in changes.items():
        module = names[name].module
        if getattr(module, "network_current_names", ()) == ():
            continue
        target = module.out_proj.weight if param == "out_proj.weight" else getattr(module, param)
        key = by_id[id(target)]
        out[key] = (base[key].double() + delta).to(base[key].dtype)
    assert sum(not torch.equal(out[k], base[k]) for k in base) > 10
    return out


def _job(extension, tmp_path, **kw):
    from extensions_lib.dreambooth.job import train_dreambooth_file
    from extensions_lib.dreambooth.options import DreamBoothTrainOptions
    from extensions_lib.jobs.training import TrainRequest

    values = dict(model_name="subj", data_root=str(tmp_path.parent / "inst"), instance_prompt="a photo of sks thing",
                  training_width=64, training_height=64, seed=1, steps=2, learn_rate="1e-3", batch_size=1,
                  save_every=0, create_image_every=0, write_csv_every=0, save_resume_state=False,
                  use_8bit_adam=False, log_directory=str(tmp_path / "logs"))
    values.update(kw)
    runner = extension.runner
    p = runner.wait(runner.start(train_dreambooth_file, TrainRequest(DreamBoothTrainOptions(**values),
                                                                     extension.context()),
                                 title="Training subj", panel="train_dreambooth"), 600)
    assert p.state == "done", p.error
    return p.result


def _host_with_lora_merged(tmp_path, checkpoint):
    """A host whose last generation used <lora:mix:1>: (host, extension, model, own weights, LoRA tensors)."""
    host = standin_host(tmp_path)
    ns = host.__enter__()
    extension = _extension(ns)
    sd_model = ns.load_model(checkpoint)
    own = _params(sd_model)
    tensors = _lora_file(sd_model, ns.data_dir / "models" / "Lora" / "mix.safetensors")
    ns.networks.list_available_networks()
    ns.networks.load_networks(sd_model, ["mix"], [1.0])
    _generate(sd_model)
    merged = _params(sd_model)
    assert not torch.equal(merged[_te_key(merged)], own[_te_key(merged)])  # the LoRA is in the weights now
    return host, ns, extension, sd_model, own, tensors


def _te_key(params):
    return next(k for k in params if k.startswith("cond_stage_model.") and re.search(r"(in_proj_weight|q_proj\.weight)$", k))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_full_fine_tune_after_a_merged_lora_trains_the_checkpoint_and_keeps_it(tmp_path, tiny_checkpoint, family):
    make_folder(tmp_path / "inst", n=2, size=(64, 64))
    host, ns, extension, sd_model, own, tensors = _host_with_lora_merged(tmp_path / "h", tiny_checkpoint(family))
    try:
        merged = _params(sd_model)
        result = _job(extension, tmp_path / "h", mode="full", keep_trained_weights=True)

        # The file: the untrained text encoder is the checkpoint's own, not the merged one.
        written, checkpoint = load_file(str(result.final_path)), load_file(str(tiny_checkpoint(family)))
        te = [k for k in checkpoint if k.startswith("cond_stage_model.")]
        assert te and all(torch.equal(written[k], checkpoint[k]) for k in te)
        # The UNet was trained from its own weights: two Adam steps of 1e-3 away from them, while the merged
        # weights lay far off (the LoRA changed every UNet Linear).
        trained = _params(sd_model)
        unet = [k for k in own if k.startswith("model.") and not torch.equal(merged[k], own[k])]
        assert unet
        for k in unet:
            assert (trained[k] - own[k]).abs().max() < 0.01 < (merged[k] - own[k]).abs().max(), k
        assert all(torch.equal(trained[k], own[k]) for k in own if k.startswith("cond_stage_model."))

        # The LoRA is still the loaded network: the next generation applies it to the kept trained weights.
        _generate(sd_model)
        expected = _merged_expected(sd_model, trained, tensors)
        after = _params(sd_model)
        for k in after:
            torch.testing.assert_close(after[k], expected[k], rtol=0, atol=1e-6, msg=k)
        # A prompt without it: the extension's backup gives back exactly the trained weights.
        ns.networks.load_networks(sd_model, [], [])
        _generate(sd_model)
        assert all(torch.equal(p, trained[k]) for k, p in _params(sd_model).items())
    finally:
        host.__exit__(None, None, None)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_lora_training_after_a_merged_lora_starts_from_the_checkpoint(tmp_path, tiny_checkpoint, family):
    make_folder(tmp_path / "inst", n=2, size=(64, 64))
    lora = dict(mode="lora", train_text_encoder=True, lora_rank=2, lora_alpha=3.0, learn_rate="3e-2")
    host, ns, extension, sd_model, own, tensors = _host_with_lora_merged(tmp_path / "h", tiny_checkpoint(family))
    try:
        merged_outputs = _generate(sd_model)
        result = _job(extension, tmp_path / "h", **lora)
        trained_file = load_file(str(result.final_path))
        # The model as the extension's record wants it: re-merged from the checkpoint's weights at the next
        # generation, and exactly the checkpoint's once no LoRA is asked for.
        after = _generate(sd_model)
        torch.testing.assert_close(after[0], merged_outputs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after[1], merged_outputs[1], rtol=1e-5, atol=1e-6)
        ns.networks.load_networks(sd_model, [], [])
        _generate(sd_model)
        assert all(torch.equal(p, own[k]) for k, p in _params(sd_model).items())
    finally:
        host.__exit__(None, None, None)

    # The same run on a host that never merged anything writes the same LoRA.
    with standin_host(tmp_path / "clean") as clean:
        extension = _extension(clean)
        clean.load_model(tiny_checkpoint(family))
        reference = load_file(str(_job(extension, tmp_path / "clean", **lora).final_path))
    assert set(reference) == set(trained_file)
    for k, v in reference.items():
        torch.testing.assert_close(trained_file[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_own_weights_is_a_no_op_without_the_lora_extension():
    from extensions_lib.host.merged_networks import own_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Conv2d(2, 2, 1), torch.nn.MultiheadAttention(4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with own_weights(model) as count:
        assert count == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, a) for m in model.modules()
                   for a in ("network_layer_name", "network_current_names", "network_weights_backup"))


def test_own_weights_restores_a_backup_as_the_extension_does():
    """Restated: weights copied back, a bias without backup removed (a network had added it), MHA's pair."""
    from extensions_lib.host.merged_networks import own_weights

    linear, mha = torch.nn.Linear(3, 3, bias=False), torch.nn.MultiheadAttention(4, 1)
    w, in_w, out_w, out_b = torch.randn(3, 3), torch.randn(12, 4), torch.randn(4, 4), torch.randn(4)
    linear.network_weights_backup, linear.network_bias_backup = w, None
    linear.bias = torch.nn.Parameter(torch.ones(3))
    mha.network_weights_backup, mha.network_bias_backup = (in_w, out_w), out_b
    for m, name in ((linear, "a"), (mha, "b")):
        m.network_current_names, m.network_layer_name = (("x", 1.0, 1.0, None),), name
    with own_weights(torch.nn.ModuleList([linear, mha])) as count:
        assert count == 2 and linear.network_layer_name is None and mha.network_layer_name is None
        assert torch.equal(linear.weight, w) and linear.bias is None
        assert torch.equal(mha.in_proj_weight, in_w) and torch.equal(mha.out_proj.weight, out_w)
        assert torch.equal(mha.out_proj.bias, out_b)
    for m, name in ((linear, "a"), (mha, "b")):
        assert m.network_layer_name == name and m.network_current_names == ()
        assert m.network_weights_backup is None and m.network_bias_backup is None
