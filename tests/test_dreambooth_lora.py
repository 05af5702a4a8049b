"""LoRA files: the kohya layout the WebUI's Lora extension expects (checked with a restatement of its loader,
tests/host_lora_reference.py), the same change in our model as in the host's merge, and an exact undo."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from extensions_lib.backend.standalone import load_model
from extensions_lib.dreambooth.files import save_lora
from extensions_lib.dreambooth.lora import apply_lora_file, attach_lora, load_lora_file
from host_lora_reference import load_network, merged_state_dict, names_of_checkpoint


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    tokens = torch.randint(0, 49000, (2, 77), generator=g)
    with torch.no_grad():
        cond = model.encode_token_chunks(tokens)
        return cond, model.predict(x, torch.tensor([10, 700]), cond)


def _trained_lora_file(model, path, rank=2, alpha=3.0):
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    patch = attach_lora(parts, rank, alpha)
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in patch.parameters():  # as if trained: the up weights start at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        save_lora(patch, path, {"note": "test"})
        return len(patch.layers)
    finally:
        patch.remove()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_lora_file_follows_the_hosts_rules_and_matches_its_merge(tmp_path, tiny_model, tiny_checkpoint, family):
    model = tiny_model(family)
    before = _outputs(model)
    path = tmp_path / "my-lora.safetensors"
    layers = _trained_lora_file(model, path)
    tensors = load_file(str(path))
    assert set(tensors) == {f"{n}.{p}" for n in {k.split(".")[0] for k in tensors}
                            for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(tensors) == 3 * layers
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.") for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc2.") for k in tensors)
    ldm = load_file(str(tiny_checkpoint(family)))
    names = names_of_checkpoint(ldm.keys(), {k: tuple(v.shape) for k, v in ldm.items()})
    matched, failed = load_network(tensors, names)
    assert failed == {}
    assert len(matched) == layers
    for entry in matched.values():
        assert entry.down.shape[0] == entry.up.shape[1] == 2 and entry.scale() == 3.0 / 2
    kinds = {(e.sd_key.startswith("diffusion_model"), e.layer.kind) for e in matched.values()}
    assert (True, "linear") in kinds and (False, "linear") in kinds
    assert ((False, "mha") in kinds) == (family == "sd2")  # SD2's q/k/v land on OpenCLIP's attention
    assert ((True, "conv") in kinds) == (family == "sd1")  # SD1's proj_in/proj_out are 1x1 convs

    # The host's merge of the file at 0.7 and our patch at 0.7 give the same model.
    merged_path = tmp_path / "merged.safetensors"
    save_file(merged_state_dict(ldm, tensors, 0.7), str(merged_path))
    host_cond, host_eps = _outputs(load_model(merged_path))
    patch, missing = apply_lora_file({"unet": model.unet, "text_encoder": model.text_encoder},
                                     load_lora_file(path), 0.7)
    try:
        assert missing == []
        ours_cond, ours_eps = _outputs(model)
    finally:
        patch.remove()
    torch.testing.assert_close(ours_cond, host_cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_eps, host_eps, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours_eps, before[1], atol=1e-3)  # the LoRA changes the output
    after = _outputs(model)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # undo is exact


def test_txt2img_applies_lora_files(tmp_path, tiny_model, tiny_checkpoint, capsys):
    from PIL import Image

    from extensions_lib.cli import main
    from extensions_lib.dreambooth.apply import loras_applied

    model = tiny_model("sd1")
    lora_dir = tmp_path / "Lora" / "sub"
    _trained_lora_file(model, lora_dir / "subj.safetensors")
    _trained_lora_file(model, lora_dir / "other.safetensors", rank=3, alpha=1.0)
    before = _outputs(model)
    with loras_applied(model, ["subj:0.5", "other"], tmp_path / "Lora") as patches:
        assert len(patches) == 2 and all(p.layers for p in patches)
        stacked = _outputs(model)
    assert not torch.allclose(stacked[1], before[1], atol=1e-3)
    after = _outputs(model)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])

    common = ["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--prompt", "a photo of sks dog", "--width", "64",
              "--height", "64", "--steps", "3", "--seed", "7", "--lora-dir", str(tmp_path / "Lora")]
    for out, extra in (("plain", []), ("zero", ["--lora", "subj:0"]), ("one", ["--lora", "subj"])):
        assert main([*common, "--out", str(tmp_path / f"{out}.png"), *extra]) == 0
    pixels = {n: Image.open(tmp_path / f"{n}.png").tobytes() for n in ("plain", "zero", "one")}
    assert pixels["zero"] == pixels["plain"] and pixels["one"] != pixels["plain"]
    from extensions_lib.errors import AlchemyError
    for bad, message in (("../subj", "not a file name"), ("nothere", "no LoRA named")):
        with pytest.raises(AlchemyError, match=message):
            with loras_applied(model, [bad], tmp_path / "Lora"):
                pass


def test_foreign_lora_parts_apply_as_the_host_applies_them(tmp_path, tiny_model, tiny_checkpoint):
    """A ``scale`` part replaces alpha/rank; on SD2 an attention missing one of q/k/v/out is not changed at
    all by the host (it merges the four into OpenCLIP's attention), so txt2img --lora leaves it out too."""
    model = tiny_model("sd2")
    path = tmp_path / "foreign.safetensors"
    _trained_lora_file(model, path)
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.startswith("lora_te_text_model_encoder_layers_0_self_attn_k_proj.")]:
        del tensors[key]
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.scale"] = torch.tensor(0.25)
    merged_path = tmp_path / "merged.safetensors"
    save_file(merged_state_dict(load_file(str(tiny_checkpoint("sd2"))), tensors, 1.0), str(merged_path))
    host = _outputs(load_model(merged_path))
    patch, missing = apply_lora_file({"unet": model.unet, "text_encoder": model.text_encoder}, tensors, 1.0,
                                     family="sd2")
    try:
        ours = _outputs(model)
    finally:
        patch.remove()
    assert sorted(missing) == [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("out", "q", "v")]
    torch.testing.assert_close(ours[0], host[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], host[1], rtol=1e-4, atol=1e-5)
