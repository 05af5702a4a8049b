"""Checkpoint reading, family detection, the .yaml override, short hash and bad-input errors."""
from __future__ import annotations

import hashlib
import os
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from extensions_lib.backend.checkpoint import detect, open_checkpoint, short_hash
from extensions_lib.backend.standalone import load_model
from extensions_lib.errors import AlchemyError


def _state_dict(path):
    with open_checkpoint(path) as reader:
        return {k: reader.take(k) for k in reader.keys()}


def _detect(path):
    with open_checkpoint(path) as reader:
        return detect(reader)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("family,expected", [("sd1", ("sd1", "eps")), ("sd2", ("sd2", "eps")), ("sd2-v", ("sd2", "v"))])
def test_detection_from_tensors(tiny_checkpoint, tiny_model, family, expected, fmt):
    detected = _detect(tiny_checkpoint(family, fmt))
    assert detected.family == expected[0]
    assert detected.context_dim == 32 and detected.text_width == 32 and detected.unet_channels == 32
    # SD1 is always eps; SD2 needs the WebUI's UNet probe, which load_model runs
    assert detected.prediction_type == ("eps" if family == "sd1" else None)
    model = tiny_model(family) if fmt == "safetensors" else load_model(tiny_checkpoint(family, fmt))
    assert (model.family, model.prediction_type) == expected


def test_ckpt_and_safetensors_hold_the_same_tensors(tiny_checkpoint):
    a, b = _state_dict(tiny_checkpoint("sd2", "safetensors")), _state_dict(tiny_checkpoint("sd2", "ckpt"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    raw = torch.load(tiny_checkpoint("sd2", "ckpt"), map_location="cpu", weights_only=True)
    assert set(raw) >= {"state_dict"}       # wrapped as real training checkpoints are


YAML_V = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        layer: "penultimate"
"""


def test_yaml_beside_checkpoint_overrides_detection(tiny_checkpoint, tmp_path):
    eps_file = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint("sd2"), eps_file)
    (tmp_path / "model.yaml").write_text(YAML_V)
    detected = _detect(eps_file)
    assert (detected.family, detected.prediction_type) == ("sd2", "v")
    assert detected.source.endswith("model.yaml")
    model = load_model(eps_file)
    assert model.prediction_type == "v"      # the probe alone would say eps

    v_file = tmp_path / "vmodel.safetensors"
    shutil.copy(tiny_checkpoint("sd2-v"), v_file)
    (tmp_path / "vmodel.yaml").write_text(YAML_V.replace('parameterization: "v"', "use_ema: false"))
    assert load_model(v_file).prediction_type == "eps"


def test_bad_yaml_is_named(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint("sd1"), ckpt)
    (tmp_path / "m.yaml").write_text("model: [unclosed\n")
    with pytest.raises(AlchemyError) as err:
        load_model(ckpt)
    assert err.value.path == str(tmp_path / "m.yaml")


def test_short_hash_is_sha256_prefix(tiny_checkpoint, tiny_model):
    path = tiny_checkpoint("sd1")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert short_hash(path) == expected
    model = tiny_model("sd1")
    assert model.checkpoint_hash == expected and model.checkpoint_name == path.stem


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_checkpoint_loads_as_float32_on_cpu(tiny_checkpoint, tmp_path, stored):
    sd = _state_dict(tiny_checkpoint("sd1"))
    half = {k: v.to(stored) if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model = load_model(path)
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for m in model.modules().values() for p in m.parameters())
    for key, param in [("model.diffusion_model.input_blocks.0.0.weight", model.unet.conv_in.weight),
                       ("first_stage_model.decoder.conv_out.weight", model.vae.decoder.conv_out.weight),
                       ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                        model.text_encoder.text_model.embeddings.token_embedding.weight)]:
        torch.testing.assert_close(param, half[key].float(), rtol=0, atol=0)
    with torch.no_grad():
        out = model.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert load_model(path, dtype=torch.bfloat16).dtype == torch.bfloat16


# --- bad input ------------------------------------------------------------------------------------------

def _expect_error(path, *words):
    before = sorted(os.listdir(path.parent)) if path.parent.exists() else None
    with pytest.raises(AlchemyError) as err:
        load_model(path)
    assert err.value.path == str(path)
    message = err.value.message.lower()
    for word in words:
        assert word in message, message
    assert err.value.fix
    if before is not None:
        assert sorted(os.listdir(path.parent)) == before     # nothing written
    return err.value


def test_directory_missing_empty(tmp_path):
    _expect_error(tmp_path, "folder")
    _expect_error(tmp_path / "nope.safetensors", "not found")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    _expect_error(tmp_path / "empty.ckpt", "empty")


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_truncated_file(tiny_checkpoint, tmp_path, fmt):
    data = tiny_checkpoint("sd1", fmt).read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated" if fmt == "safetensors" else "damaged")


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]},           # 4 floats declared in 8 bytes
    {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]},
    {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]},
])
def test_bad_safetensors_entry_is_refused_before_reading(tmp_path, entry):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, {"w": entry}, bytes(16))
    assert "bad entry for 'w'" in str(_expect_error(path, "damaged"))


def test_safetensors_tensors_read_exactly(tmp_path):
    path = tmp_path / "ok.safetensors"
    values = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.tensor([7, -1], dtype=torch.int64),
              "c": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "e": torch.zeros(0, 4)}
    save_file(values, str(path))
    got = _state_dict(path)
    for key, value in values.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value)


def test_safetensors_tensors_read_into_one_scratch_buffer(tmp_path):
    path = tmp_path / "ok.safetensors"
    values = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.tensor([1.5, -2.25, 3.0]),
              "c": torch.tensor([7, -1], dtype=torch.int64)}
    save_file(values, str(path))
    with open_checkpoint(path) as reader:
        scratch = torch.zeros(max(reader.nbytes(k) for k in reader.keys()), dtype=torch.uint8)
        for key, value in values.items():
            got = reader.take(key, scratch)
            assert reader.nbytes(key) == value.numel() * value.element_size()
            assert got.dtype == value.dtype and torch.equal(got, value)
            assert got.data_ptr() == scratch.data_ptr()     # read into the buffer, not into memory of its own
        small = torch.zeros(2, dtype=torch.uint8)            # too small: the reader allocates instead
        got = reader.take("b", small)
        assert torch.equal(got, values["b"]) and got.data_ptr() != small.data_ptr()


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, this is not a model\n" * 10)
    _expect_error(text, "not a checkpoint")
    zip_path = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("readme.txt", "not torch")
    _expect_error(zip_path, "not a readable pytorch file")
    emb = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "x"}, emb)
    _expect_error(emb, "not a model checkpoint")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, str(lora))
    _expect_error(lora, "no unet weights")


def test_malicious_pickle_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Boom()}}, path)
    with pytest.raises(AlchemyError) as err:
        load_model(path)
    assert err.value.path == str(path) and "os.system" in err.value.message.replace("posix", "os")
    assert not (tmp_path / "pwned").exists()


def _write_modified(tiny_checkpoint, tmp_path, name, change):
    sd = _state_dict(tiny_checkpoint("sd1"))
    change(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_missing_wrong_shape_wrong_dtype(tiny_checkpoint, tmp_path):
    key = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight"
    missing = _write_modified(tiny_checkpoint, tmp_path, "missing.safetensors", lambda sd: sd.pop(key))
    err = _expect_error(missing, "missing")
    assert key in err.message

    def reshape(sd):
        sd[key] = sd[key][:, :-1].contiguous()
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "shape.safetensors", reshape), "wrong shape", key)

    def retype(sd):
        sd[key] = torch.zeros(sd[key].shape, dtype=torch.int32)
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "dtype.safetensors", retype), "wrong dtype")

    def no_text(sd):
        for k in [k for k in sd if k.startswith("cond_stage_model.")]:
            del sd[k]
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "notext.safetensors", no_text), "no text encoder")

    def extra_block(sd):
        sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "extra.safetensors", extra_block), "unexpected")


def test_inpainting_and_sdxl_are_refused_clearly(tiny_checkpoint, tmp_path):
    def nine_channels(sd):
        w = sd["model.diffusion_model.input_blocks.0.0.weight"]
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1).contiguous()
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "inpaint.safetensors", nine_channels), "inpainting")

    def sdxl(sd):
        for k in [k for k in sd if k.startswith("cond_stage_model.")]:
            sd[k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")] = sd.pop(k)
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "xl.safetensors", sdxl), "sdxl")


def test_unknown_architecture(tiny_checkpoint, tmp_path):
    def widen(sd):
        for k in [k for k in sd if "token_embedding" in k]:
            sd[k] = torch.zeros(49408, 48)
    _expect_error(_write_modified(tiny_checkpoint, tmp_path, "odd.safetensors", widen), "unknown")


def test_yaml_declares_v_for_an_sd1_finetune(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "sd1v.safetensors"
    shutil.copy(tiny_checkpoint("sd1"), ckpt)
    (tmp_path / "sd1v.yaml").write_text(
        "model:\n  params:\n    parameterization: v\n    cond_stage_config:\n"
        "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n")
    model = load_model(ckpt)
    assert (model.family, model.prediction_type) == ("sd1", "v")
    assert model.config.scheduler["prediction_type"] == "v_prediction"


def test_full_training_state_ckpt_loads_the_weights_only(tiny_checkpoint, tmp_path, monkeypatch, tiny_model):
    """A Lightning training checkpoint: weights under "state_dict" beside optimizer state, schedulers, a
    ModelCheckpoint callback object and the EMA copy (``model_ema.*``), as SD's own v1-5 full .ckpt has."""
    import sys
    import types

    sd = _state_dict(tiny_checkpoint("sd1"))
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = sd["model.diffusion_model.input_blocks.0.0.weight"] + 1
    mod_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(mod_name)
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mod_name})
    fake.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod_name, fake)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
                "callbacks": {ModelCheckpoint: ModelCheckpoint()}, "optimizer_states": [optimizer.state_dict()],
                "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 3}]}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod_name):
        monkeypatch.delitem(sys.modules, name)

    model = load_model(path)
    assert mod_name not in sys.modules            # nothing was imported to read it
    reference = tiny_model("sd1")
    for name, module in model.modules().items():
        theirs = reference.modules()[name].state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, theirs[key]), (name, key)   # the EMA copy did not replace anything
    assert not any(key.startswith("model_ema.") for key in model.extras)
