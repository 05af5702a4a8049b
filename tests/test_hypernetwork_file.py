"""Hypernetwork .pt files: the genuine WebUI files load and compute as their raw tensors say; ours have the
host's layout, pass its loader's rules and re-read bit-exactly; bad files are refused naming the file."""
from __future__ import annotations

import os
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from extensions_lib.errors import AlchemyError
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.formats.torch_pt import save_pt
from extensions_lib.hypernetworks.create import create_hypernetwork, new_hypernetwork
from extensions_lib.hypernetworks.file import (METADATA_KEYS, optimizer_path, read_hypernetwork,
                                               read_optimizer_state, shorthash, to_file_dict, write_hypernetwork)
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
from extensions_lib.hypernetworks.options import CreateHypernetworkOptions
from extensions_lib.safe_pickle import safe_load

GENUINE = ("ref-hn-121-relu.pt", "ref-hn-121-relu-trained.pt")


def plain_121_relu(x, sd, multiplier=1.0):
    """The documented [1, 2, 1] relu module: x + (W2 relu(W0 x + b0) + b2) * multiplier."""
    hidden = F.relu(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"]))
    return x + F.linear(hidden, sd["linear.2.weight"], sd["linear.2.bias"]) * multiplier


# ---- genuine WebUI files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fname,step,ckpt,ckpt_name", [
    ("ref-hn-121-relu.pt", 0, None, None),
    ("ref-hn-121-relu-trained.pt", 3, "b60ad7926a", "random-sd15"),
])
def test_genuine_files_load_with_their_metadata(webui_files, fname, step, ckpt, ckpt_name):
    hn = read_hypernetwork(webui_files / fname)
    assert hn.sizes == [320]
    assert hn.arch.layer_structure == (1.0, 2.0, 1.0)
    assert hn.arch.activation_func == "relu"
    assert (hn.arch.add_layer_norm, hn.arch.activate_output, hn.use_dropout) == (False, False, False)
    assert hn.arch.dropout_structure == (0, 0, 0)
    assert (hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name) == (step, ckpt, ckpt_name)
    assert hn.name == fname[:-3] and hn.weight_init == "Normal"
    assert all(not m.training for m in hn.modules())


@pytest.mark.parametrize("fname", GENUINE)
def test_genuine_files_compute_what_their_raw_tensors_say(webui_files, fname):
    raw = safe_load(webui_files / fname)
    hn = read_hypernetwork(webui_files / fname)
    x = torch.randn(2, 9, 320, generator=torch.Generator().manual_seed(0))
    for which in (0, 1):
        module = hn.layers[320][which]
        for mult in (1.0, 0.6):
            torch.testing.assert_close(module(x, mult), plain_121_relu(x, raw[320][which], mult), rtol=0, atol=1e-6)


def test_trained_file_differs_from_the_untrained_one(webui_files):
    a = read_hypernetwork(webui_files / GENUINE[0]).layers[320][0].state_dict()
    b = read_hypernetwork(webui_files / GENUINE[1]).layers[320][0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fname", GENUINE)
def test_our_dict_has_the_genuine_layout(webui_files, fname):
    """Re-saving a genuine file gives the same keys, order, value types and tensors as the host wrote."""
    raw = safe_load(webui_files / fname)
    ours = to_file_dict(read_hypernetwork(webui_files / fname))
    assert list(ours) == list(raw) == [320, *METADATA_KEYS]
    for key in METADATA_KEYS:
        assert type(ours[key]) is type(raw[key]) and ours[key] == raw[key], key
        if isinstance(raw[key], list):
            assert [type(v) for v in ours[key]] == [type(v) for v in raw[key]], key
    assert isinstance(ours[320], tuple) and len(ours[320]) == 2
    for mine, theirs in zip(ours[320], raw[320]):
        assert isinstance(mine, OrderedDict) and list(mine) == list(theirs)
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in theirs)


def test_genuine_files_pass_the_host_rules(webui_files):
    for fname in GENUINE:
        assert check_host_loadable(webui_files / fname) == []


# ---- our files -----------------------------------------------------------------------------------------

def _assert_same(a: Hypernetwork, b: Hypernetwork):
    assert (a.name, a.arch, a.sizes, a.step, a.weight_init, a.use_dropout, a.sd_checkpoint,
            a.sd_checkpoint_name, a.optional_info) == (b.name, b.arch, b.sizes, b.step, b.weight_init,
                                                       b.use_dropout, b.sd_checkpoint, b.sd_checkpoint_name,
                                                       b.optional_info)
    for size in a.sizes:
        for ma, mb in zip(a.layers[size], b.layers[size]):
            sa, sb = ma.state_dict(), mb.state_dict()
            assert list(sa) == list(sb)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("opts", [
    CreateHypernetworkOptions(name="default", sizes=[320]),
    CreateHypernetworkOptions(name="fancy", sizes=[1024, 320], layer_structure="1, 1.5, 0.5, 1", activation="swish",
                              weight_init="XavierNormal", layer_norm=True, use_dropout=True,
                              dropout_structure="0, 0.05, 0.15, 0", activate_output=True),
])
def test_written_file_passes_host_rules_and_rereads_bit_exact(tmp_path, opts):
    hn = new_hypernetwork(opts)
    hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name, hn.optional_info = 7, "0123456789", "model", "notes"
    path = tmp_path / f"{hn.name}.pt"
    write_hypernetwork(hn, path)
    assert check_host_loadable(path) == []
    again = read_hypernetwork(path)
    _assert_same(hn, again)
    raw = safe_load(path)
    assert list(raw) == [*hn.sizes, *METADATA_KEYS]
    assert raw["last_layer_dropout"] == (opts.use_dropout and bool(hn.arch.dropout_structure[-2]))


def test_created_defaults_match_the_hosts_create_tab(tmp_path):
    # The default sizes (768, 320, 640, 1280) make a 90 MB file; two of them show the same: order as given.
    path = create_hypernetwork(CreateHypernetworkOptions(name="new one", sizes=[768, 320]), tmp_path)
    assert path == tmp_path / "new one.pt"
    raw = safe_load(path)
    assert [k for k in raw if type(k) is int] == [768, 320]
    assert raw["layer_structure"] == [1.0, 2.0, 1.0] and all(type(v) is float for v in raw["layer_structure"])
    assert raw["dropout_structure"] == [0, 0, 0] and all(type(v) is int for v in raw["dropout_structure"])
    assert (raw["activation_func"], raw["weight_initialization"], raw["step"]) == ("linear", "Normal", 0)
    assert (raw["is_layer_norm"], raw["use_dropout"], raw["activate_output"], raw["last_layer_dropout"]) == \
        (False, False, False, False)
    assert raw["sd_checkpoint"] is None and raw["optional_info"] is None


def test_create_never_overwrites_without_permission(tmp_path):
    path = create_hypernetwork(CreateHypernetworkOptions(name="keep", sizes=[320]), tmp_path)
    before = path.read_bytes()
    with pytest.raises(AlchemyError, match="already exists") as exc:
        create_hypernetwork(CreateHypernetworkOptions(name="keep", sizes=[320]), tmp_path)
    assert str(path) in str(exc.value)
    assert path.read_bytes() == before
    create_hypernetwork(CreateHypernetworkOptions(name="keep", sizes=[640], overwrite=True), tmp_path)
    assert read_hypernetwork(path).sizes == [640]


@pytest.mark.parametrize("opts,match", [
    (CreateHypernetworkOptions(name="///"), "empty"),
    (CreateHypernetworkOptions(name="a", layer_structure="2, 2, 1"), "start and end with 1"),
    (CreateHypernetworkOptions(name="a", layer_structure="1, x, 1"), "not a comma-separated"),
    (CreateHypernetworkOptions(name="a", activation="nosuch"), "nosuch"),
    (CreateHypernetworkOptions(name="a", use_dropout=True, dropout_structure="0, 0.1, 0.1"), "start and end with 0"),
    (CreateHypernetworkOptions(name="a", use_dropout=True, dropout_structure="0, 0.1"), "one entry per"),
    (CreateHypernetworkOptions(name="a", sizes=[]), "no module sizes"),
])
def test_bad_create_options_are_refused(tmp_path, opts, match):
    with pytest.raises(AlchemyError, match=match):
        create_hypernetwork(opts, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- the .optim side file ----------------------------------------------------------------------------------

def _trained_optimizer_state(hn):
    hn.train()
    opt = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    x = torch.randn(1, 4, 16)
    hn.layers[16][0](x).square().sum().backward()
    opt.step()
    hn.eval()
    return opt.state_dict()


def test_optimizer_side_file_round_trip_and_hash_check(tmp_path):
    hn = Hypernetwork.create("opt", [16], Architecture((1, 2, 1), "relu"))
    hn.optimizer_name, hn.optimizer_state_dict = "AdamW", _trained_optimizer_state(hn)
    path = tmp_path / "opt.pt"
    write_hypernetwork(hn, path, save_optimizer_state=True)
    assert check_host_loadable(optimizer_path(path)) == []
    side = safe_load(optimizer_path(path))
    assert list(side) == ["optimizer_name", "hash", "optimizer_state_dict"]
    assert side["hash"] == shorthash(path) and len(side["hash"]) == 10

    name, state = read_optimizer_state(path)
    assert name == "AdamW"
    want = hn.optimizer_state_dict
    assert state["param_groups"] == want["param_groups"]
    for idx, entry in want["state"].items():
        assert all(torch.equal(torch.as_tensor(entry[k]), torch.as_tensor(state["state"][idx][k])) for k in entry)

    hn.step = 1  # the .pt changes without a new side file: the stale state must not be used
    write_hypernetwork(hn, path)
    assert read_optimizer_state(path) == ("AdamW", None)


def test_no_side_file_means_fresh_adamw(tmp_path):
    hn = Hypernetwork.create("plain", [16], Architecture((1, 2, 1)))
    write_hypernetwork(hn, tmp_path / "plain.pt", save_optimizer_state=True)  # no state: nothing to save
    assert not optimizer_path(tmp_path / "plain.pt").exists()
    assert read_optimizer_state(tmp_path / "plain.pt") == ("AdamW", None)


# ---- host load defaults and old files --------------------------------------------------------------------

def test_missing_keys_take_the_hosts_load_defaults(tmp_path):
    """Without 'activate_output' the host puts the activation after the output layer too (default True)."""
    g = torch.Generator().manual_seed(3)
    sd = OrderedDict([("linear.0.weight", torch.randn(16, 8, generator=g)), ("linear.0.bias", torch.randn(16, generator=g)),
                      ("linear.2.weight", torch.randn(8, 16, generator=g)), ("linear.2.bias", torch.randn(8, generator=g))])
    save_pt({8: (sd, sd), "activation_func": "tanh", "layer_structure": [1, 2, 1]}, tmp_path / "old.pt")
    hn = read_hypernetwork(tmp_path / "old.pt")
    assert hn.arch.activate_output is True and hn.name == "old" and hn.step == 0
    assert hn.arch.dropout_structure == (0, 0, 0) and hn.weight_init == "Normal"
    x = torch.randn(2, 3, 8)
    want = x + torch.tanh(F.linear(torch.tanh(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"])),
                                   sd["linear.2.weight"], sd["linear.2.bias"]))
    torch.testing.assert_close(hn.layers[8][1](x), want)


def test_oldest_files_with_linear1_linear2_keys_load(tmp_path):
    g = torch.Generator().manual_seed(4)
    w1, b1, w2, b2 = torch.randn(16, 8, generator=g), torch.randn(16, generator=g), torch.randn(8, 16, generator=g), \
        torch.randn(8, generator=g)
    sd = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    save_pt({8: (sd, sd)}, tmp_path / "ancient.pt")
    hn = read_hypernetwork(tmp_path / "ancient.pt")
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(hn.layers[8][0](x), x + F.linear(F.linear(x, w1, b1), w2, b2))


# ---- bad files ----------------------------------------------------------------------------------------

def _good_dict():
    return to_file_dict(Hypernetwork.create("x", [8], Architecture((1, 2, 1), "relu")))


def _bad_files(tmp_path):
    files = {}
    d = _good_dict()
    d["activation_func"] = "nosuch"
    files["nosuch"] = (d, "nosuch")
    d = _good_dict()
    d["layer_structure"] = [2.0, 2.0, 1.0]
    files["badstructure"] = (d, "start and end with 1")
    d = _good_dict()
    d["layer_structure"] = [1.0, float("nan"), 1.0]
    files["nanstructure"] = (d, "not a positive number")
    d = _good_dict()
    d["step"] = "three"
    files["badstep"] = (d, "not an integer")
    d = _good_dict()
    d[8] = (d[8][0],)
    files["halfpair"] = (d, "pair")
    d = _good_dict()
    d["layer_structure"] = [1.0, 3.0, 1.0]
    files["mismatch"] = (d, "does not match")
    files["embedding"] = ({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)},
                           "name": "emb", "step": 0}, "embedding")
    files["lora"] = ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, "LoRA")
    for stem, (data, _) in files.items():
        save_pt(data, tmp_path / f"{stem}.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    truncated = (tmp_path / "nosuch.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(truncated[: len(truncated) // 2])
    expected = {stem: match for stem, (_, match) in files.items()}
    expected.update({"random": "not a readable", "truncated": "not a readable"})
    return expected


def test_bad_files_are_refused_naming_the_file(tmp_path):
    for stem, match in _bad_files(tmp_path).items():
        path = tmp_path / f"{stem}.pt"
        with pytest.raises(AlchemyError, match=match) as exc:
            read_hypernetwork(path)
        assert exc.value.path == str(path), stem
        assert exc.value.fix, stem


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({8: Evil()}, tmp_path / "evil.pt")
    with pytest.raises(AlchemyError, match="evil.pt"):
        read_hypernetwork(tmp_path / "evil.pt")
    assert not marker.exists()


# ---- written by the host's torch ----------------------------------------------------------------------------

HOST_PYTHON = Path(__file__).resolve().parents[1] / ".venv-torch21" / "bin" / "python"

_WRITE_WITH_HOST_TORCH = """
import sys, torch
from safetensors.torch import save_file
from extensions_lib.hypernetworks.create import new_hypernetwork
from extensions_lib.hypernetworks.file import write_hypernetwork
from extensions_lib.hypernetworks.options import CreateHypernetworkOptions
assert torch.__version__.startswith("2.1."), torch.__version__
torch.manual_seed(0)
hn = new_hypernetwork(CreateHypernetworkOptions(name="host", sizes=[320, 768], activation="swish", layer_norm=True))
write_hypernetwork(hn, sys.argv[1])
save_file({f"{s}.{i}.{k}": v.contiguous() for s, pair in hn.layers.items() for i, m in enumerate(pair)
           for k, v in m.state_dict().items()}, sys.argv[2])
"""


@pytest.mark.skipif(not HOST_PYTHON.exists() or torch.__version__.startswith("2.1."),
                    reason="needs the torch 2.1 environment, run from the main one")
def test_file_written_under_host_torch_loads_here_bit_exact(tmp_path):
    from safetensors.torch import load_file

    pt, ref = tmp_path / "host.pt", tmp_path / "host.safetensors"
    subprocess.run([str(HOST_PYTHON), "-c", _WRITE_WITH_HOST_TORCH, str(pt), str(ref)], check=True,
                   cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert check_host_loadable(pt) == []
    hn = read_hypernetwork(pt)
    tensors = load_file(ref)
    assert hn.sizes == [320, 768] and hn.arch.activation_func == "swish" and hn.arch.add_layer_norm
    for size, pair in hn.layers.items():
        for i, module in enumerate(pair):
            for key, value in module.state_dict().items():
                assert torch.equal(value, tensors[f"{size}.{i}.{key}"])


@pytest.mark.parametrize("fname", GENUINE)
def test_rewritten_genuine_file_has_the_hosts_exact_pickle(tmp_path, webui_files, fname):
    """Same pickle bytes as the host wrote, module state dicts' `_metadata` included, and same tensor data."""
    import zipfile

    path = tmp_path / fname
    write_hypernetwork(read_hypernetwork(webui_files / fname), path)
    assert check_host_loadable(path) == []
    assert safe_load(path)[320][0]._metadata == safe_load(webui_files / fname)[320][0]._metadata
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(webui_files / fname) as theirs:
        names = [n for n in theirs.namelist() if not n.endswith("serialization_id")]
        assert sorted(n for n in ours.namelist() if not n.endswith("serialization_id")) == sorted(names)
        for name in names:
            assert ours.read(name) == theirs.read(name), name
