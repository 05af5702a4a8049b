"""safe_load: allow-listed torch files load exactly; anything that would run code is refused unrun."""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.safe_pickle import InertPlaceholder, safe_load


class _RunsShell:
    """Pickles as `os.system(<command>)`: unpickling it without restriction runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch_command(marker) -> str:
    return f"touch '{marker}'"


def _binunicode(text: str) -> bytes:
    """The BINUNICODE opcode pushing `text`."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _raw_global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-2 pickle bytes for `module.name(arg)` written opcode by opcode (no class needed)."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + _binunicode(arg) + b"\x85R."


def _rewrite_torch_zip(data: bytes, edit) -> bytes:
    """Copy a torch zip, passing each (name, bytes) through `edit`; entries stay uncompressed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, edit(info.filename, src.read(info.filename)))
    return out.getvalue()


def _torch_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


# --- refused ---------------------------------------------------------------------------------------

def test_raw_pickle_with_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(_RunsShell(_touch_command(marker))))
    with pytest.raises(AlchemyError) as err:
        safe_load(bad)
    assert not marker.exists()
    assert str(bad) in err.value.message
    assert "system" in err.value.message  # names the forbidden global (os.system pickles as posix.system)


def test_torch_zip_with_reduce_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil-zip.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": _RunsShell(_touch_command(marker))}, bad)
    assert zipfile.is_zipfile(bad)
    with pytest.raises(AlchemyError) as err:
        safe_load(bad)
    assert not marker.exists()
    assert str(bad) in err.value.message and "system" in err.value.message


@pytest.mark.parametrize("module,name", [
    ("builtins", "exec"), ("builtins", "eval"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("subprocess", "Popen"), ("os", "system"), ("__builtin__", "eval"), ("torch", "load"),
    ("_codecs", "decode"), ("numpy", "load"),
])
def test_forbidden_globals_in_torch_zip_are_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payload = {"exec": f"open({str(marker)!r}, 'w')", "eval": f"open({str(marker)!r}, 'w')"}.get(
        name, _touch_command(marker))
    evil_pkl = _raw_global_call(module, name, payload)
    good = _torch_bytes({"a": torch.ones(2)})
    path = tmp_path / "evil.pt"
    path.write_bytes(_rewrite_torch_zip(good, lambda n, b: evil_pkl if n.endswith("data.pkl") else b))
    with pytest.raises(AlchemyError) as err:
        safe_load(path)
    assert not marker.exists()
    assert f"{module}.{name}" in err.value.message and str(path) in err.value.message


def test_codecs_encode_only_for_latin1(tmp_path):
    # protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"): that must load ...
    ok = tmp_path / "proto2.pt"
    torch.save({"raw": b"\x00\xff"}, ok, pickle_protocol=2, _use_new_zipfile_serialization=False)
    assert b"_codecs" in ok.read_bytes()
    assert safe_load(ok)["raw"] == b"\x00\xff"
    # ... but no other codec (a legacy file's first object is read through the same unpickler)
    bad = tmp_path / "codec.pt"
    bad.write_bytes(b"\x80\x02c_codecs\nencode\n" + _binunicode("abc") + _binunicode("rot_13") + b"\x86R.")
    with pytest.raises(AlchemyError) as err:
        safe_load(bad)
    assert "rot_13" in err.value.message


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, os.urandom(4096), b"PK\x03\x04 truncated zip"])
def test_garbage_is_a_clear_error_naming_the_file(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(AlchemyError) as err:
        safe_load(path)
    assert str(path) in err.value.message and err.value.fix


def test_truncated_torch_file(tmp_path):
    data = _torch_bytes({"w": torch.randn(64, 64)})
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AlchemyError) as err:
        safe_load(path)
    assert str(path) in err.value.message


def test_missing_file(tmp_path):
    with pytest.raises(AlchemyError) as err:
        safe_load(tmp_path / "nope.pt")
    assert "nope.pt" in err.value.message


# --- loaded ----------------------------------------------------------------------------------------

def test_plain_structures_round_trip_exactly(tmp_path):
    t = torch.randn(3, 5)
    obj = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": t},
        "nested": {"list": [1, 2.5, "x", None, True], "tuple": (1, (2, 3)), "od": collections.OrderedDict(b=t[0])},
        "set": {1, 2}, "fset": frozenset({"a"}), "complex": 1 + 2j, "slice": slice(1, 5, 2),
        "size": torch.Size([2, 3]), "dtype": torch.float16, "bytes": b"\x00\xff",
        "ints": torch.arange(10, dtype=torch.int64), "bool": torch.tensor([True, False]),
        "bf16": torch.randn(4).to(torch.bfloat16), "view": t[1:, 2:],
    }
    path = tmp_path / "ok.pt"
    torch.save(obj, path)
    out = safe_load(path)
    assert isinstance(out["nested"]["od"], collections.OrderedDict)
    for key in ("string_to_token", "set", "fset", "complex", "slice", "size", "dtype", "bytes"):
        assert out[key] == obj[key]
    assert out["nested"]["list"] == obj["nested"]["list"] and out["nested"]["tuple"] == obj["nested"]["tuple"]
    for key in ("ints", "bool", "bf16", "view"):
        assert out[key].dtype == obj[key].dtype and torch.equal(out[key], obj[key])
    assert torch.equal(out["string_to_param"]["*"], t)
    assert torch.equal(out["nested"]["od"]["b"], t[0])


def test_parameters_and_parameter_dict_load(tmp_path):
    pd = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 8))})
    obj = {"p": torch.nn.Parameter(torch.randn(4)), "string_to_param": pd}
    path = tmp_path / "params.pt"
    torch.save(obj, path)
    out = safe_load(path)
    assert isinstance(out["p"], torch.nn.Parameter) and torch.equal(out["p"], obj["p"])
    assert isinstance(out["string_to_param"], torch.nn.ParameterDict)
    assert torch.equal(out["string_to_param"]["*"], pd["*"])


def test_fp16_is_kept_bit_exact(tmp_path):
    t = torch.randn(2, 768).half()
    path = tmp_path / "half.pt"
    torch.save({"*": t}, path)
    out = safe_load(path)["*"]
    assert out.dtype == torch.float16 and torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_tensor_saved_on_cuda_loads_on_cpu(tmp_path):
    t = torch.randn(2, 16)
    data = _torch_bytes({"*": t})
    cpu, cuda = _binunicode("cpu"), _binunicode("cuda:0")

    def relocate(name, body):
        if name.endswith("data.pkl"):
            assert body.count(cpu) == 1
            return body.replace(cpu, cuda)
        return body

    path = tmp_path / "cuda.pt"
    path.write_bytes(_rewrite_torch_zip(data, relocate))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # proves the file really says cuda:0
            torch.load(path, weights_only=False)
    out = safe_load(path)["*"]
    assert out.device.type == "cpu" and torch.equal(out, t)


def test_legacy_non_zip_format(tmp_path):
    t = torch.randn(3, 3)
    path = tmp_path / "legacy.pt"
    torch.save({"*": t, "step": 7}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    out = safe_load(path)
    assert out["step"] == 7 and torch.equal(out["*"], t)


def test_legacy_non_zip_format_with_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy-evil.pt"
    torch.save({"x": _RunsShell(_touch_command(marker))}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(AlchemyError):
        safe_load(path)
    assert not marker.exists()


def test_numpy_scalars_and_arrays(tmp_path):
    obj = {"global_step": np.int64(1234), "arr": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = tmp_path / "np.ckpt"
    torch.save(obj, path)
    out = safe_load(path)
    assert out["global_step"] == 1234 and out["global_step"].dtype == np.int64
    assert np.array_equal(out["arr"], obj["arr"]) and out["arr"].dtype == np.float32


def test_lightning_callback_becomes_placeholder_without_import(tmp_path, monkeypatch):
    mod_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(mod_name)

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/somewhere/last.ckpt"

    ModelCheckpoint.__module__ = mod_name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, mod_name, fake)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"cb": ModelCheckpoint()}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod_name):
        monkeypatch.delitem(sys.modules, name)
    out = safe_load(path)
    cb = out["callbacks"]["cb"]
    assert isinstance(cb, InertPlaceholder) and mod_name + ".ModelCheckpoint" in repr(cb)
    assert cb.state == {"best_model_path": "/somewhere/last.ckpt"}
    assert mod_name not in sys.modules
    assert torch.equal(out["state_dict"]["w"], torch.ones(2))


def test_file_object_and_extra_allowed(tmp_path):
    buf = io.BytesIO(_torch_bytes({"od": collections.Counter("aab")}))
    with pytest.raises(AlchemyError) as err:
        safe_load(buf)
    assert "collections.Counter" in err.value.message
    buf.seek(0)
    assert safe_load(buf, extra_allowed=["collections.Counter"])["od"] == collections.Counter("aab")
    buf.seek(0)
    assert safe_load(buf, extra_allowed=[("collections", "Counter")])["od"]["a"] == 2


def test_genuine_webui_files_load(webui_files):
    emb = safe_load(webui_files / "ref-emb-2v.pt")
    assert emb["string_to_param"]["*"].shape == (2, 768)
    hn = safe_load(webui_files / "ref-hn-121-relu.pt")
    assert 320 in hn


def _call_pickle(module: str, name: str, args: bytes) -> bytes:
    """Protocol 2: GLOBAL module.name, the pickled args tuple (opcodes), REDUCE, STOP."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + args + b"R."


_HUGE = b"\x8a\x05\x00\xe8vH\x17\x85"  # LONG1 10**11, TUPLE1


@pytest.mark.parametrize("module, name, args", [
    ("builtins", "bytearray", _HUGE),
    ("__builtin__", "set", b"cbuiltins\nrange\n" + _HUGE + b"R\x85"),
    ("builtins", "frozenset", b"cbuiltins\nrange\n" + _HUGE + b"R\x85"),
    ("torch", "UntypedStorage", _HUGE),
    ("numpy", "ndarray", b"\x8a\x05\x00\xe8vH\x17\x85\x85"),  # ndarray((10**11,))
    ("numpy.core.multiarray", "_reconstruct", b"cnumpy\nndarray\n\x8a\x05\x00\xe8vH\x17\x85U\x01b\x87"),
])
def test_allowed_constructors_are_refused_sizes_the_file_cannot_back(tmp_path, module, name, args):
    path = tmp_path / "bomb.pt"
    path.write_bytes(_call_pickle(module, name, args))
    with pytest.raises(AlchemyError, match="declares .* more than the file's"):
        safe_load(path)


def test_allowed_constructors_still_build_what_the_file_can_back(tmp_path):
    path = tmp_path / "small.pt"
    path.write_bytes(_call_pickle("builtins", "bytearray", b"K\x10\x85"))  # bytearray(16), then torch's magic check
    with pytest.raises(AlchemyError, match="not a readable PyTorch file"):  # refused later, for being no torch file
        safe_load(path)
