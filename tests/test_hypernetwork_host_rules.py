"""Hypernetwork files cross the boundary with the WebUI both ways, checked against an independent
re-statement of the host's own code (tests/host_hypernetwork_reference.py, written from a1111-host.md):

- files we write, for every create option (activations, layer norm, dropout, activate_output, last-layer
  dropout, fractional structures, weight inits), pass the host's safe loader, build in its module code
  with a strict state-dict load, carry the same metadata and compute bit-identical outputs (eval at any
  strength, and training mode with dropout);
- files the host writes, for the same combinations and for the older layouts that lack later keys, load
  in ours and compute bit-identically;
- the genuine WebUI files read the same in the re-statement as in ours (so the re-statement is right).
"""
from __future__ import annotations

import pytest
import torch

from extensions_lib.hypernetworks.create import new_hypernetwork
from extensions_lib.hypernetworks.file import read_hypernetwork, write_hypernetwork
from extensions_lib.hypernetworks.options import CreateHypernetworkOptions
from host_hypernetwork_reference import HostHypernetwork, host_load_hypernetwork, host_optimizer

SIZES = [16, 24]

OUR_COMBOS = {
    "defaults-linear": dict(),
    "relu": dict(activation="relu"),
    "swish-layernorm": dict(activation="swish", layer_norm=True),
    "leakyrelu-kaiming-activate-output": dict(activation="leakyrelu", weight_init="KaimingUniform",
                                              activate_output=True),
    "prelu-xavier": dict(activation="prelu", weight_init="XavierNormal"),
    "tanh-fractional-dropout": dict(activation="tanh", layer_structure="1, 1.5, 0.5, 1", use_dropout=True,
                                    dropout_structure="0, 0.05, 0.15, 0"),
    "elu-last-layer-dropout-layernorm": dict(activation="elu", layer_structure="1, 2, 2, 1", use_dropout=True,
                                             dropout_structure="", last_layer_dropout=True, layer_norm=True),
    "gelu-single-layer": dict(activation="gelu", layer_structure="1, 1", activate_output=True),
    "sigmoid-kaimingnormal-dropout": dict(activation="sigmoid", weight_init="KaimingNormal", use_dropout=True,
                                          dropout_structure="0, 0.3, 0"),
    "xavieruniform-dropout-off": dict(activation="silu", weight_init="XavierUniform", use_dropout=False,
                                      dropout_structure="0, 0.2, 0"),
}


def _randomise(parameters, seed=0):
    """Visible weights everywhere (new modules are nearly zero), so any difference in structure shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _same_outputs(host, ours, dropout: bool):
    """Every (width, k/v) module of `host` and `ours` gives bit-identical outputs, in eval mode at several
    strengths and (with dropout) in training mode from the same random state."""
    assert list(host.layers) == ours.sizes
    for size in ours.sizes:
        x = torch.randn(2, 5, size, generator=torch.Generator().manual_seed(size))
        for host_module, our_module in zip(host.layers[size], ours.layers[size]):
            assert [type(m) for m in host_module.linear] == [type(m) for m in our_module.linear]
            for mult in (1.0, 0.35):
                host.set_multiplier(mult)
                ours.set_multiplier(mult)
                with torch.no_grad():
                    assert torch.equal(host_module(x), our_module(x)), (size, mult)
            if dropout:
                host.train()
                ours.train()
                torch.manual_seed(7)
                a = host_module(x)
                torch.manual_seed(7)
                b = our_module(x)
                host.eval()
                ours.eval()
                assert torch.equal(a, b)


# ---- ours -> the host --------------------------------------------------------------------------------------

@pytest.mark.parametrize("combo", sorted(OUR_COMBOS))
def test_files_we_write_load_in_the_hosts_code_and_compute_the_same(tmp_path, combo):
    torch.manual_seed(1)
    hn = new_hypernetwork(CreateHypernetworkOptions(name=combo, sizes=SIZES, **OUR_COMBOS[combo]))
    _randomise(hn.parameters())
    hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name, hn.optional_info = 12, "0123456789", "model-a", "notes"
    path = tmp_path / f"{combo}.pt"
    write_hypernetwork(hn, path)

    host = host_load_hypernetwork(path)  # vetted by the host's safe-loader rules, strict state-dict load
    arch = hn.arch
    assert (host.layer_structure, host.activation_func, host.add_layer_norm, host.activate_output) == \
        (list(arch.layer_structure), arch.activation_func, arch.add_layer_norm, arch.activate_output)
    assert (host.dropout_structure, host.use_dropout, host.last_layer_dropout) == \
        (list(arch.dropout_structure), hn.use_dropout, hn.last_layer_dropout)
    assert (host.name, host.step, host.weight_init, host.sd_checkpoint, host.sd_checkpoint_name,
            host.optional_info) == (combo, 12, hn.weight_init, "0123456789", "model-a", "notes")
    assert (host.optimizer_name, host.optimizer_state_dict) == ("AdamW", None)
    _same_outputs(host, hn, dropout=any(arch.dropout_structure))


@pytest.mark.parametrize("weight_init", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
@pytest.mark.parametrize("activation,layer_norm", [("relu", False), ("leakyrelu", True), ("prelu", True)])
def test_a_new_hypernetwork_is_the_hosts_bit_for_bit_from_the_same_seed(weight_init, activation, layer_norm):
    """Same layers built in the same order and initialised from the same random stream as the host's
    create_hypernetwork (its LayerNorm quirk, std-0 biases, Kaiming's leaky_relu gain included)."""
    torch.manual_seed(4)
    host = HostHypernetwork(name="n", enable_sizes=SIZES, layer_structure=[1.0, 2.0, 1.0], activation_func=activation,
                            weight_init=weight_init, add_layer_norm=layer_norm, dropout_structure=[0, 0, 0])
    torch.manual_seed(4)
    ours = new_hypernetwork(CreateHypernetworkOptions(name="n", sizes=SIZES, activation=activation,
                                                      weight_init=weight_init, layer_norm=layer_norm))
    mine, theirs = ours.parameters(), host.weights()
    assert len(mine) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_optimizer_state_we_write_resumes_in_the_hosts_optimizer(tmp_path):
    """The host builds AdamW over every parameter of every module (PReLU slopes included) and loads our
    side file's state into it only while the hash matches the .pt."""
    hn = new_hypernetwork(CreateHypernetworkOptions(name="opt", sizes=SIZES, activation="prelu"))
    hn.train()
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    for module in hn.modules():
        module(torch.randn(1, 3, module.dim)).square().sum().backward()
    optimizer.step()
    hn.eval()
    hn.optimizer_name, hn.optimizer_state_dict = "AdamW", optimizer.state_dict()
    path = tmp_path / "opt.pt"
    write_hypernetwork(hn, path, save_optimizer_state=True)

    host = host_load_hypernetwork(path)
    assert host.optimizer_name == "AdamW" and host.optimizer_state_dict is not None
    resumed = host_optimizer(host).state_dict()["state"]
    assert len(resumed) == len(hn.parameters())
    for i, entry in optimizer.state_dict()["state"].items():
        assert torch.equal(resumed[i]["exp_avg"], entry["exp_avg"])


# ---- the host -> ours --------------------------------------------------------------------------------------

HOST_COMBOS = {
    "linear": (dict(layer_structure=[1.0, 2.0, 1.0], activation_func="linear", weight_init="Normal"), ()),
    "swish-layernorm-xavier": (dict(layer_structure=[1.0, 2.0, 1.0], activation_func="swish",
                                    weight_init="XavierUniform", add_layer_norm=True), ()),
    "prelu-dropout": (dict(layer_structure=[1.0, 1.5, 1.0], activation_func="prelu", weight_init="KaimingNormal",
                           use_dropout=True, dropout_structure=[0.0, 0.2, 0.0]), ()),
    "relu-activate-output-layernorm": (dict(layer_structure=[1.0, 2.0, 2.0, 1.0], activation_func="relu",
                                            activate_output=True, add_layer_norm=True,
                                            dropout_structure=[0, 0.1, 0.25, 0], use_dropout=True), ()),
    # Nov 2022 files: no dropout_structure yet; the host derives it from use_dropout/last_layer_dropout.
    "no-dropout-structure": (dict(layer_structure=[1, 2, 2, 1], activation_func="relu", use_dropout=True,
                                  last_layer_dropout=True), ("dropout_structure",)),
    # Oct 2022 files: the output was always activated; a missing activate_output loads as True.
    "no-activate-output": (dict(layer_structure=[1, 2, 1], activation_func="tanh", activate_output=True),
                           ("activate_output", "use_dropout", "dropout_structure", "last_layer_dropout",
                            "optional_info")),
    # ... which for a single-layer structure is one entry longer than the layer structure (the host uses
    # only the entries it needs).
    "single-layer-no-dropout-structure": (dict(layer_structure=[1, 1], activation_func="relu", use_dropout=True,
                                               last_layer_dropout=True, activate_output=True),
                                          ("dropout_structure",)),
    # The first files: modules only (plus step/name); every architecture key takes its load default.
    "modules-only": (dict(layer_structure=[1, 2, 1], activation_func=None, activate_output=True),
                     ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                      "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                      "last_layer_dropout", "optional_info")),
}


@pytest.mark.parametrize("combo", sorted(HOST_COMBOS))
def test_files_the_host_writes_load_in_ours_and_compute_the_same(tmp_path, combo):
    kwargs, missing = HOST_COMBOS[combo]
    torch.manual_seed(2)
    written = HostHypernetwork(name=combo, enable_sizes=SIZES, **{"weight_init": "Normal", **kwargs})
    _randomise(written.weights(), seed=3)
    written.step = 40
    path = tmp_path / f"{combo}.pt"
    written.save(path, legacy_keys=missing)

    host = host_load_hypernetwork(path, vet=False)  # how the host itself reads it back
    ours = read_hypernetwork(path)
    assert (ours.name, ours.step) == (combo, 40)
    assert (list(ours.arch.layer_structure), ours.arch.activation_func, ours.arch.add_layer_norm,
            ours.arch.activate_output, list(ours.arch.dropout_structure), ours.use_dropout, ours.weight_init) == \
        (host.layer_structure, host.activation_func, host.add_layer_norm, host.activate_output,
         host.dropout_structure, host.use_dropout, host.weight_init)
    _same_outputs(host, ours, dropout=any(host.dropout_structure))
    _same_outputs(written, ours, dropout=any(written.dropout_structure))  # and as the writing host ran it


# ---- the genuine files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fname", ["ref-hn-121-relu.pt", "ref-hn-121-relu-trained.pt"])
def test_genuine_files_read_the_same_in_the_restatement_and_in_ours(webui_files, fname):
    host = host_load_hypernetwork(webui_files / fname)
    ours = read_hypernetwork(webui_files / fname)
    assert (host.name, host.step, host.sd_checkpoint, host.activate_output) == \
        (ours.name, ours.step, ours.sd_checkpoint, ours.arch.activate_output)
    _same_outputs(host, ours, dropout=False)
