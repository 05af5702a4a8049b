"""LoRA inside the (stand-in) WebUI: our layers sit on the host's own LDM modules under the kohya names
its Lora extension converts back to exactly those modules (checked with the restatement of its loader,
tests/host_lora_reference.py, not with our naming code); a DreamBooth LoRA job trains there, writes into
the host's Lora folder, has the host rescan its list, leaves the model's outputs exactly as before, and
the host's application of the file at weight 1 equals our patched model."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from extensions_lib.dreambooth.lora import attach_lora
from extensions_lib.host.lora_list import refresh_host_lora_list
from extensions_lib.host.webui_adapter import WebUIModelAdapter
from host_lora_reference import HostRefuses, apply_to_model, load_network, names_of_model, read_metadata, shown_for
from test_dreambooth_lora import _outputs  # fixed latents/tokens through any adapter
from train_fakes import make_folder
from webui_standin.harness import standin_host


def _parts(sd_model):
    return {"unet": sd_model.model, "text_encoder": sd_model.cond_stage_model}


def _expected_targets(sd_model) -> set[int]:
    """What kohya trains, found by module class (not by name): Linear/1x1-conv layers inside the UNet's
    transformer blocks, the text encoder's attention and MLP layers (OpenCLIP's attention as one)."""
    out = set()
    for module in sd_model.model.modules():
        if type(module).__name__ in ("SpatialTransformer", "Transformer2DModel"):
            out |= {id(m) for m in module.modules()
                    if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    for module in sd_model.cond_stage_model.modules():
        if type(module).__name__ in ("CLIPAttention", "CLIPMLP"):
            out |= {id(m) for m in module.modules() if isinstance(m, nn.Linear)}
        elif type(module).__name__ == "ResidualAttentionBlock":
            out |= {id(module.attn), id(module.mlp.c_fc), id(module.mlp.c_proj)}
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_host_layers_get_the_names_the_hosts_loader_maps_back_to_them(tmp_path, tiny_checkpoint, family):
    with standin_host(tmp_path) as host:
        sd_model = host.load_model(tiny_checkpoint(family))
        adapter = WebUIModelAdapter(sd_model, "cpu")
        names = names_of_model(sd_model.cond_stage_model, sd_model.model)  # as the host names them at load
        before = _outputs(adapter)
        patch = attach_lora(_parts(sd_model), rank=2, alpha=4.0, seed=3)
        try:
            wrapped = {id(original) for _root, _path, original in patch._undo}
            tensors = patch.state_dict()
            with torch.no_grad():  # as if trained (up starts at zero): the patched model now differs
                for p in patch.parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
            changed = _outputs(adapter)
        finally:
            patch.remove()
        assert wrapped == _expected_targets(sd_model)
        matched, failed = load_network(tensors, names)
        assert failed == {}
        reached = set()
        for entry in matched.values():
            module = entry.layer.module
            if entry.sd_key.endswith("_out_proj") and family == "sd2" and "resblocks" in entry.sd_key:
                module = names[entry.sd_key[:-len("_out_proj")]].module  # applied through its attention
            reached.add(id(module))
        assert reached == wrapped
        if family == "sd2":  # all four of every attention, or the host applies none of them
            assert sum(e.layer.kind == "mha" for e in matched.values()) == 3 * 2
        after = _outputs(adapter)
        assert not torch.allclose(changed[1], before[1], atol=1e-4) and not torch.allclose(changed[0], before[0])
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # detached exactly


def _train(host, extension, data, family, **changes):
    from extensions_lib.dreambooth.job import train_dreambooth_file
    from extensions_lib.dreambooth.options import DreamBoothTrainOptions
    from extensions_lib.jobs.training import TrainRequest

    values = dict(model_name="subj", data_root=str(data), instance_prompt="a photo of sks thing",
                  training_width=64, training_height=64, seed=1, steps=3, learn_rate="3e-2", batch_size=1,
                  save_every=0, create_image_every=0, write_csv_every=0, mode="lora", train_text_encoder=True,
                  lora_rank=2, lora_alpha=3.0, save_resume_state=False, use_8bit_adam=False)
    values.update(changes)
    request = TrainRequest(options=DreamBoothTrainOptions(**values), context=extension.context())
    runner = extension.runner
    job_id = runner.start(train_dreambooth_file, request, title="Training subj", panel="train_dreambooth")
    progress = runner.wait(job_id, 600)
    assert progress.state == "done", progress.error
    return progress.result


def _extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_lora_trained_in_the_host_loads_there_and_matches_our_patch(tmp_path, tiny_checkpoint, family):
    with standin_host(tmp_path) as host:
        extension = _extension(host)
        sd_model = host.load_model(tiny_checkpoint(family))
        adapter = WebUIModelAdapter(sd_model, "cpu")
        before = _outputs(adapter)
        calls = host.networks.list_calls
        result = _train(host, extension, make_folder(tmp_path / "inst", 2), family)

        path = host.data_dir / "models" / "Lora" / "subj.safetensors"
        assert result.final_path == path and path.is_file()
        assert host.networks.list_calls == calls + 1  # the host rescanned its Lora folder
        entry = host.networks.available_networks["subj"]
        assert entry.alias == "subj" and entry.sd_version == family.upper()
        meta = read_metadata(path)
        assert shown_for(meta, family) and not shown_for(meta, "sd2" if family == "sd1" else "sd1")
        after = _outputs(adapter)
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # model untouched

        tensors = load_file(str(path))
        assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
        for prefix in ("lora_unet_", "lora_te_"):  # both trained away from the zero init
            assert any(t.abs().max() > 0 for k, t in tensors.items() if k.startswith(prefix) and "lora_up" in k)
        if family == "sd2":  # OpenCLIP's attention too
            assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].abs().max() > 0

        # Ours: the trained layers on the host's model (same attach, weights from the file).
        patch = attach_lora(_parts(sd_model), rank=2, alpha=3.0, device="cpu")
        try:
            with torch.no_grad():
                for name, layer in patch.layers.items():
                    layer.down.weight.copy_(tensors[f"{name}.lora_down.weight"].reshape(layer.down.weight.shape))
                    layer.up.weight.copy_(tensors[f"{name}.lora_up.weight"].reshape(layer.up.weight.shape))
            ours = _outputs(adapter)
        finally:
            patch.remove()
        # The host's: <lora:subj:1> merged into its weights by the restated rules.
        matched, failed = apply_to_model(sd_model.cond_stage_model, sd_model.model, tensors, 1.0)
        assert failed == {} and len(matched) == len(tensors) // 3  # every (down, up, alpha) group
        hosts = _outputs(adapter)
        assert not torch.allclose(hosts[1], before[1], atol=1e-4)
        torch.testing.assert_close(ours[0], hosts[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[1], hosts[1], rtol=1e-4, atol=1e-5)


def test_lora_trains_in_a_medvram_host(tmp_path, tiny_checkpoint):
    """--medvram: the UNet and the text encoder are parked away from the device by turns (the stand-in
    parks them as meta tensors); the LoRA layers travel with their part and the file holds trained weights."""
    with standin_host(tmp_path, medvram=True) as host:
        extension = _extension(host)
        sd_model = host.load_model(tiny_checkpoint("sd1"))
        adapter = WebUIModelAdapter(sd_model, "cpu")
        before = _outputs(adapter)
        result = _train(host, extension, make_folder(tmp_path / "inst", 1), "sd1", steps=2)
        assert host.lowvram.moves.count("DiffusionWrapper") >= 3  # the UNet (with the LoRA) was parked and back
        tensors = load_file(str(result.final_path))
        assert all(torch.isfinite(t).all() for t in tensors.values())
        assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))
        matched, failed = load_network(tensors, names_of_model(sd_model.cond_stage_model, sd_model.model))
        assert failed == {} and len(matched) == len(tensors) // 3
        after = _outputs(adapter)
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_lora_job_without_the_hosts_lora_extension(tmp_path, tiny_checkpoint):
    with standin_host(tmp_path, lora_extension=False) as host:
        extension = _extension(host)
        host.load_model(tiny_checkpoint("sd1"))
        result = _train(host, extension, make_folder(tmp_path / "inst", 1), "sd1", steps=1,
                        train_text_encoder=False)
        assert result.final_path == host.data_dir / "models" / "Lora" / "subj.safetensors"
        assert result.final_path.is_file()


def test_lora_list_refresh_is_guarded():
    class Networks:
        available_networks: dict = {}
        calls = 0

        def list_available_networks(self):
            Networks.calls += 1

    assert refresh_host_lora_list({}) is False  # extension absent
    assert refresh_host_lora_list({"networks": object()}) is False  # some other module of that name
    assert refresh_host_lora_list({"networks": Networks()}) is True and Networks.calls == 1

    class Broken(Networks):
        def list_available_networks(self):
            raise OSError("disk gone")

    assert refresh_host_lora_list({"networks": Broken()}) is False


def test_restated_loader_refuses_what_the_host_refuses():
    from host_lora_reference import Layer

    names = {"diffusion_model_input_blocks_1_1_proj_in": Layer("conv", (8, 8, 1, 1)),
             "diffusion_model_input_blocks_1_0_in_layers_0": Layer("other", (8,))}
    down, up = torch.ones(2, 8, 1, 1), torch.ones(8, 2, 1, 1)
    ok, failed = load_network({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
                               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up,
                               "lora_unet_nowhere.alpha": torch.tensor(1.0)}, names)
    assert list(ok) == ["diffusion_model_input_blocks_1_1_proj_in"] and list(failed) == ["lora_unet_nowhere.alpha"]
    with pytest.raises(HostRefuses, match="no module type"):  # a group without up/down fails the whole file
        load_network({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}, names)
    with pytest.raises(HostRefuses, match="unsupported type"):  # a LoRA on a norm layer
        load_network({"lora_unet_down_blocks_0_resnets_0_norm1.lora_down.weight": torch.ones(2, 8),
                      "lora_unet_down_blocks_0_resnets_0_norm1.lora_up.weight": torch.ones(8, 2)}, names)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_standalone_and_host_training_write_the_same_layers(tmp_path, tiny_checkpoint, tiny_model, family):
    """A LoRA trained with `alchemy dreambooth train` and one trained inside the WebUI name and shape the same
    layers, so either file serves both (`txt2img --lora` and `<lora:...>`)."""
    model = tiny_model(family)
    patch = attach_lora({"unet": model.unet, "text_encoder": model.text_encoder}, rank=2, alpha=2.0)
    try:
        standalone = {k: tuple(v.shape) for k, v in patch.state_dict().items()}
    finally:
        patch.remove()
    with standin_host(tmp_path) as host:
        sd_model = host.load_model(tiny_checkpoint(family))
        patch = attach_lora(_parts(sd_model), rank=2, alpha=2.0)
        try:
            hosted = {k: tuple(v.shape) for k, v in patch.state_dict().items()}
        finally:
            patch.remove()
    assert hosted == standalone


def test_gradient_checkpointing_in_the_host(tmp_path, tiny_checkpoint):
    """The host's UNet has no diffusers switch: its residual and transformer blocks are checkpointed by
    instance patch (recomputed in the backward pass), the trained file is the same, the patch is undone."""
    from extensions_lib.dreambooth.memory import checkpointing

    with standin_host(tmp_path) as host:
        extension = _extension(host)
        sd_model = host.load_model(tiny_checkpoint("sd1"))
        unet = sd_model.model
        block = next(m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
        calls = []
        hook = block.conv1.register_forward_hook(lambda *a: calls.append(1))  # inside: seen when recomputed
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
        width = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
        context = torch.randn(1, 77, width, requires_grad=True)

        def forward_backward() -> int:
            calls.clear()
            unet(x, t, c_crossattn=[context]).sum().backward()
            return len(calls)

        try:
            assert forward_backward() == 1
            undo = checkpointing(unet)
            assert forward_backward() == 2  # run again in the backward pass
            undo()
            assert forward_backward() == 1 and not any("forward" in vars(m) for m in unet.modules())
        finally:
            hook.remove()

        data = make_folder(tmp_path / "inst", 1)
        plain = load_file(str(_train(host, extension, data, "sd1", steps=2).final_path))
        checkpointed = load_file(str(_train(host, extension, data, "sd1", steps=2,
                                            gradient_checkpointing=True).final_path))
        assert plain.keys() == checkpointed.keys()
        for key in plain:
            torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)
        assert not any("forward" in vars(m) for m in sd_model.modules())
