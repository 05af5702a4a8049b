"""save_pt writes files a stock WebUI v1.10.1 accepts, whichever torch writes them; check_host_loadable
applies the host's rules. Cross-checked with an unpickling re-implementation of the host's safe loader
and with the host's torch (2.1) in a subprocess."""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from extensions_lib.formats.host_pt_rules import check_host_loadable, pickle_globals
from extensions_lib.formats.torch_pt import load_pt, save_pt
from host_pt_reference import HostUnpickler as _HostUnpickler, host_check_pt

REPO = Path(__file__).resolve().parents[1]
TORCH21 = REPO / ".venv-torch21" / "bin" / "python"

def embedding_like(n=2, width=768, dtype=torch.float32):
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.randn(n, width).to(dtype)},
        "name": "thing", "step": 3, "sd_checkpoint": "b60ad7926a", "sd_checkpoint_name": "random-sd15",
    }


def test_written_file_has_exactly_the_host_entries_and_alignment(tmp_path):
    path = save_pt(embedding_like(), tmp_path / "thing.pt")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert sorted(names) == sorted(["thing/data.pkl", "thing/byteorder", "thing/data/0", "thing/version",
                                        "thing/.data/serialization_id"])
        raw = path.read_bytes()
        for info in z.infolist():
            # local header: 30 bytes + name + extra; its extra length is at offset 28
            name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
                int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            assert start % 64 == 0, info.filename
            assert raw[start:start + info.file_size] == z.read(info.filename)
    assert check_host_loadable(path) == []
    host_check_pt(path)


def test_round_trip_is_bit_exact_and_plain(tmp_path):
    obj = embedding_like()
    obj["hn"] = {768: (collections.OrderedDict(w=torch.randn(4, 4)), collections.OrderedDict(b=torch.randn(4)))}
    obj["half"] = torch.randn(3).half()
    obj["bf16"] = torch.randn(3).to(torch.bfloat16)
    obj["long"] = torch.arange(5)
    obj["layers"] = [1.0, 2.0, 1.0]
    obj["param"] = torch.nn.Parameter(torch.randn(2, 2))
    path = save_pt(obj, tmp_path / "rt.pt")
    host_check_pt(path)
    out = load_pt(path)
    assert type(out["param"]) is torch.Tensor and not out["param"].requires_grad
    assert torch.equal(out["param"], obj["param"].detach())
    for key in ("half", "bf16", "long"):
        assert out[key].dtype == obj[key].dtype and torch.equal(out[key], obj[key])
    assert torch.equal(out["string_to_param"]["*"], obj["string_to_param"]["*"])
    assert isinstance(out["hn"][768][0], collections.OrderedDict)
    assert torch.equal(out["hn"][768][0]["w"], obj["hn"][768][0]["w"])
    assert out["layers"] == [1.0, 2.0, 1.0] and out["step"] == 3 and out["name"] == "thing"
    assert out["string_to_token"] == {"*": 265}


def test_a_slice_does_not_drag_its_whole_matrix_along(tmp_path):
    big = torch.randn(4096, 768)
    path = save_pt({"*": big[10:12]}, tmp_path / "slice.pt")
    assert path.stat().st_size < 20_000
    assert torch.equal(load_pt(path)["*"], big[10:12])


def test_stock_torch_save_output_is_flagged_when_torch_adds_entries(tmp_path):
    path = tmp_path / "stock.pt"
    torch.save(embedding_like(), path)
    names = zipfile.ZipFile(path).namelist()
    problems = check_host_loadable(path)
    if any(n.endswith(".format_version") for n in names):  # torch >= 2.5
        assert any(".format_version" in p for p in problems)
        with pytest.raises(Exception, match="bad file inside"):
            host_check_pt(path)
    else:
        assert problems == []


@pytest.mark.parametrize("obj,needle", [
    ({"d": torch.device("cpu")}, "torch/device"),
    ({"c": collections.Counter("ab")}, "collections/Counter"),
    ({"p": torch.nn.Parameter(torch.ones(2))}, "torch._utils/_rebuild_parameter_with_state"),
    ({"s": torch.Size([1, 2])}, "torch/Size"),
])
def test_rules_flag_forbidden_globals(tmp_path, obj, needle):
    if "Parameter" in repr(obj):
        obj["p"].extra = 1  # a Parameter with python state needs a global the host lacks
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    problems = check_host_loadable(path)
    assert any(needle in p for p in problems), problems
    with zipfile.ZipFile(path) as z, z.open(next(n for n in z.namelist() if n.endswith("data.pkl"))) as fh:
        with pytest.raises(Exception, match="forbidden"):
            _HostUnpickler(fh).load()


@pytest.mark.parametrize("obj", [{"b": torch.ones(2, dtype=torch.bool)}, {"c": torch.ones(2, dtype=torch.int8)},
                                 {"x": object()}, {"d": torch.device("cpu")}])
def test_save_pt_refuses_what_the_host_cannot_load_and_keeps_old_file(tmp_path, obj):
    path = tmp_path / "keep.pt"
    path.write_bytes(b"previous good file")
    with pytest.raises(TypeError):
        save_pt(obj, path)
    assert path.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]


def test_stack_global_is_traced():
    # protocol 4 uses STACK_GLOBAL with memoised strings instead of GLOBAL
    data = pickle.dumps({"od": collections.OrderedDict(), "c": collections.Counter()}, protocol=4)
    found, end = pickle_globals(data)
    assert ("collections", "OrderedDict") in found and ("collections", "Counter") in found
    assert end == len(data)


def test_legacy_format_rules(tmp_path):
    ok = tmp_path / "legacy.pt"
    torch.save({"*": torch.randn(2, 3)}, ok, _use_new_zipfile_serialization=False)
    assert check_host_loadable(ok) == []
    bad = tmp_path / "legacy-bad.pt"
    torch.save({"*": torch.device("cpu")}, bad, _use_new_zipfile_serialization=False)
    assert any("torch/device" in p for p in check_host_loadable(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    assert check_host_loadable(junk)


def test_genuine_webui_files_pass_the_rules(webui_files):
    for path in sorted(webui_files.glob("*.pt")):
        assert check_host_loadable(path) == [], path
        host_check_pt(path)


def test_rewrite_matches_genuine_structure(tmp_path, webui_files):
    genuine = load_pt(webui_files / "ref-emb-2v-trained.pt")
    path = save_pt(genuine, tmp_path / "ref-emb-2v-trained.pt")
    ours, theirs = zipfile.ZipFile(path), zipfile.ZipFile(webui_files / "ref-emb-2v-trained.pt")
    strip = lambda z: sorted(n for n in z.namelist() if not n.endswith("serialization_id"))  # noqa: E731
    assert strip(ours) == strip(theirs)
    for name in ("ref-emb-2v-trained/data/0", "ref-emb-2v-trained/version", "ref-emb-2v-trained/byteorder"):
        assert ours.read(name) == theirs.read(name)
    assert pickle_globals(ours.read("ref-emb-2v-trained/data.pkl"))[0] == \
        pickle_globals(theirs.read("ref-emb-2v-trained/data.pkl"))[0]


# --- across torch versions (the host runs torch 2.1) -----------------------------------------------

_CROSS_SCRIPT = r"""
import json, sys, torch, numpy as np
sys.path.insert(0, sys.argv[1])
mode, path = sys.argv[2], sys.argv[3]
if mode == "read":  # what the host does once its check passed: a plain torch.load
    obj = torch.load(path, map_location="cpu")
    np.save(path + ".npy", obj["string_to_param"]["*"].numpy())
    print(json.dumps({"torch": torch.__version__, "step": obj["step"], "dtype": str(obj["string_to_param"]["*"].dtype)}))
else:
    from extensions_lib.formats.torch_pt import save_pt
    t = torch.arange(12, dtype=torch.float32).reshape(2, 6) / 7
    save_pt({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "x", "step": 5}, path)
    print(json.dumps({"torch": torch.__version__}))
"""


def _run_torch21(mode: str, path: Path) -> dict:
    if not TORCH21.exists():
        pytest.skip("no .venv-torch21")
    proc = subprocess.run([str(TORCH21), "-c", _CROSS_SCRIPT, str(REPO), mode, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["torch"].startswith("2.1.")
    return info


def test_file_written_here_loads_in_host_torch(tmp_path):
    obj = embedding_like()
    path = save_pt(obj, tmp_path / "cross.pt")
    info = _run_torch21("read", path)
    assert info["step"] == 3 and info["dtype"] == "torch.float32"
    assert np.array_equal(np.load(str(path) + ".npy"), obj["string_to_param"]["*"].numpy())


def test_file_written_by_host_torch_passes_rules_here(tmp_path):
    path = tmp_path / "from21.pt"
    _run_torch21("write", path)
    assert check_host_loadable(path) == []
    host_check_pt(path)
    out = load_pt(path)
    assert torch.equal(out["string_to_param"]["*"], torch.arange(12, dtype=torch.float32).reshape(2, 6) / 7)


def test_state_dict_metadata_is_kept_and_passes_host_rules(tmp_path):
    """torch attaches `_metadata` (per-submodule versions) to every state dict and the host pickles it;
    a rebuilt copy that dropped it would read back without it."""
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).state_dict()
    assert state._metadata  # what torch gives us
    path = save_pt({"sd": state}, tmp_path / "meta.pt")
    assert check_host_loadable(path) == []
    host_check_pt(path)
    out = load_pt(path)["sd"]
    assert out._metadata == state._metadata
    assert list(out) == list(state) and all(torch.equal(out[k], state[k]) for k in state)
    with zipfile.ZipFile(path) as z:  # what the host's own unpickler reads back
        assert _HostUnpickler(io.BytesIO(z.read("meta/data.pkl"))).load()["sd"]._metadata == state._metadata
