"""HypernetworkModule computes the WebUI's documented architecture, built and initialised as the host does.

The reference computations below are written from the documented architecture (a1111-host.md §4.2)
with torch.nn.functional on the raw state dict, independently of the module's own layer list.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from extensions_lib.errors import AlchemyError
from extensions_lib.hypernetworks.module import (ACTIVATIONS, Architecture, Hypernetwork, HypernetworkModule,
                                                 parse_dropout_structure)
from extensions_lib.hypernetworks.options import ACTIVATION_CHOICES


def _implicit_dim(x):  # torch's rule for Softmax/Softmin/LogSoftmax built without `dim`
    return 0 if x.dim() in (0, 1, 3) else 1


# name -> (function of (x, parameters of that activation layer), number of parameters it owns)
REFERENCE_ACTIVATIONS = {
    "relu": lambda x, p: F.relu(x),
    "leakyrelu": lambda x, p: F.leaky_relu(x, 0.01),
    "elu": lambda x, p: F.elu(x),
    "swish": lambda x, p: F.hardswish(x),  # the host's "swish" is hardswish
    "tanh": lambda x, p: torch.tanh(x),
    "sigmoid": lambda x, p: torch.sigmoid(x),
    "celu": lambda x, p: F.celu(x),
    "gelu": lambda x, p: F.gelu(x),
    "hardshrink": lambda x, p: F.hardshrink(x, 0.5),
    "hardsigmoid": lambda x, p: F.hardsigmoid(x),
    "hardtanh": lambda x, p: F.hardtanh(x),
    "logsigmoid": lambda x, p: F.logsigmoid(x),
    "logsoftmax": lambda x, p: F.log_softmax(x, dim=_implicit_dim(x)),
    "mish": lambda x, p: F.mish(x),
    "prelu": lambda x, p: F.prelu(x, p[0]),
    "rrelu": lambda x, p: F.leaky_relu(x, (1 / 8 + 1 / 3) / 2),  # eval mode: the mean slope
    "relu6": lambda x, p: F.relu6(x),
    "selu": lambda x, p: F.selu(x),
    "silu": lambda x, p: F.silu(x),
    "softmax": lambda x, p: F.softmax(x, dim=_implicit_dim(x)),
    "softmax2d": lambda x, p: F.softmax(x, dim=-3),
    "softmin": lambda x, p: F.softmin(x, dim=_implicit_dim(x)),
    "softplus": lambda x, p: F.softplus(x),
    "softshrink": lambda x, p: F.softshrink(x, 0.5),
    "softsign": lambda x, p: F.softsign(x),
    "tanhshrink": lambda x, p: x - torch.tanh(x),
}
PARAMETRISED = {"prelu": 1}


class _Recording:
    def __init__(self, data, used):
        self.data, self.used = data, used

    def __getitem__(self, key):
        self.used.add(key)
        return self.data[key]


def reference_forward(x, sd, dim, layer_structure, activation=None, layer_norm=False, dropout=None,
                      activate_output=False, multiplier=1.0, training=False):
    """x + mlp(x) * multiplier, where the MLP is read from `sd` by the documented key positions."""
    idx, h, used = 0, x, set()
    sd = _Recording(sd, used)
    n = len(layer_structure) - 1
    for i in range(n):
        h = F.linear(h, sd[f"linear.{idx}.weight"], sd[f"linear.{idx}.bias"])
        idx += 1
        if activation not in (None, "linear") and (i < n - 1 or activate_output):
            params = [sd[f"linear.{idx}.weight"]] if activation in PARAMETRISED else []
            h = REFERENCE_ACTIVATIONS[activation](h, params)
            idx += 1
        if layer_norm:
            width = int(dim * layer_structure[i + 1])
            h = F.layer_norm(h, (width,), sd[f"linear.{idx}.weight"], sd[f"linear.{idx}.bias"], eps=1e-5)
            idx += 1
        if dropout is not None and dropout[i + 1] > 0:
            h = F.dropout(h, dropout[i + 1], training=training)
            idx += 1
    assert used == set(sd.data), "every stored tensor was used"
    return x + h * (1.0 if training else multiplier)


def randomised(module: HypernetworkModule, seed: int = 0) -> HypernetworkModule:
    """Give every parameter visible values (the default init makes the MLP nearly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def test_every_offered_activation_has_a_reference():
    assert set(ACTIVATION_CHOICES) - {"linear"} == set(REFERENCE_ACTIVATIONS)


@pytest.mark.parametrize("activation", sorted(REFERENCE_ACTIVATIONS))
@pytest.mark.parametrize("activate_output", [False, True])
def test_forward_equals_reference_for_each_activation(activation, activate_output):
    dim, ls = 16, (1, 2, 1)
    module = randomised(HypernetworkModule(dim, Architecture(ls, activation, activate_output=activate_output))).eval()
    x = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(1))
    module.multiplier = 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit-dim softmax warns
        got = module(x)
        want = reference_forward(x, module.state_dict(), dim, ls, activation, activate_output=activate_output,
                                 multiplier=0.7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ls", [(1, 2, 1), (1, 1.5, 0.5, 1), (1, 1)])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("activation", [None, "linear", "relu"])
def test_forward_equals_reference_for_structures_and_layer_norm(ls, layer_norm, activation):
    dim = 12
    module = randomised(HypernetworkModule(dim, Architecture(ls, activation, add_layer_norm=layer_norm))).eval()
    x = torch.randn(3, 4, dim)
    want = reference_forward(x, module.state_dict(), dim, ls, activation, layer_norm=layer_norm)
    torch.testing.assert_close(module(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_dropout_structure_matches_reference(training):
    dim, ls, ds = 8, (1, 2, 2, 1), (0, 0.1, 0.25, 0)
    module = randomised(HypernetworkModule(dim, Architecture(ls, "relu", add_layer_norm=True, dropout_structure=ds)))
    module.train(training)
    module.multiplier = 0.5
    x = torch.randn(4, 6, dim)
    torch.manual_seed(123)
    got = module(x)
    torch.manual_seed(123)
    want = reference_forward(x, module.state_dict(), dim, ls, "relu", layer_norm=True, dropout=ds,
                             multiplier=0.5, training=training)
    assert torch.equal(got, want)
    if training:  # dropout really acts: another draw differs
        assert not torch.equal(module(x), got)


def test_state_dict_keys_are_the_hosts_positions():
    arch = Architecture((1, 2, 2, 1), "relu", add_layer_norm=True, dropout_structure=(0, 0.1, 0.2, 0))
    # Linear0 ReLU1 LN2 Drop3 | Linear4 ReLU5 LN6 Drop7 | Linear8 LN9 (no activation after the output)
    keys = {k.rsplit(".", 1)[0] for k in HypernetworkModule(4, arch).state_dict()}
    assert keys == {"linear.0", "linear.2", "linear.4", "linear.6", "linear.8", "linear.9"}
    plain = HypernetworkModule(4, Architecture((1, 2, 1), "relu")).state_dict()
    assert list(plain) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"]


def test_swish_is_hardswish_as_in_the_host():
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish
    assert ACTIVATIONS["linear"] is torch.nn.Identity


def test_zero_output_layer_and_strength_zero_are_bit_identical():
    dim = 10
    x = torch.randn(2, 7, dim)
    module = randomised(HypernetworkModule(dim, Architecture((1, 3, 1), "tanh"))).eval()
    assert torch.equal(module(x, multiplier=0.0), x)
    with torch.no_grad():
        module.linear[-1].weight.zero_()
        module.linear[-1].bias.zero_()
    assert torch.equal(module(x), x)


def test_multiplier_is_ignored_while_training():
    dim = 6
    module = randomised(HypernetworkModule(dim, Architecture((1, 2, 1), "relu")))
    x = torch.randn(1, 3, dim)
    module.multiplier = 0.25
    eval_out = module.eval()(x)
    train_out = module.train()(x)
    full = module.linear(x)
    torch.testing.assert_close(eval_out, x + full * 0.25)
    torch.testing.assert_close(train_out, x + full)


# ---- initialisation ------------------------------------------------------------------------------------

def _host_normal_init_reference(dim, ls, layer_norm, seed):
    """The documented Normal init replayed with the same RNG: N(0, 0.01) weights, std-0 biases, in layer order."""
    torch.manual_seed(seed)
    shapes = []
    for i in range(len(ls) - 1):
        shapes.append(("linear", (int(dim * ls[i + 1]), int(dim * ls[i]))))
        if layer_norm:
            shapes.append(("norm", (int(dim * ls[i + 1]),)))
    out = []
    for _, shape in shapes:
        w = torch.empty(shape).normal_(0.0, 0.01)
        b = torch.empty(shape[0]).normal_(0.0, 0.0)
        out += [w, b]
    return out


def test_normal_init_replays_the_hosts_random_stream_bit_exactly():
    dim, ls = 32, (1, 2, 1)
    # nn.Linear's own default init draws from the RNG first; the host's init then overwrites it.
    # Build the layers first with a throwaway seed, then init with a fixed seed, both here and in the reference.
    torch.manual_seed(99)
    module = HypernetworkModule(dim, Architecture(ls, "relu", add_layer_norm=True), weight_init=None)
    from extensions_lib.hypernetworks.module import initialise_
    torch.manual_seed(5)
    initialise_(module.linear, "Normal", "relu")
    got = [p for layer in module.linear if type(layer) in (torch.nn.Linear, torch.nn.LayerNorm)
           for p in (layer.weight, layer.bias)]
    want = _host_normal_init_reference(dim, ls, True, 5)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _linear_weights(module):
    return [layer.weight for layer in module.linear if type(layer) is torch.nn.Linear]


@pytest.mark.parametrize("init", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
@pytest.mark.parametrize("activation", ["relu", "leakyrelu"])
def test_weight_init_distributions(init, activation):
    torch.manual_seed(0)
    module = HypernetworkModule(320, Architecture((1, 2, 1), activation, add_layer_norm=True), weight_init=init)
    for layer in module.linear:
        if type(layer) in (torch.nn.Linear, torch.nn.LayerNorm):
            assert torch.count_nonzero(layer.bias) == 0
        if type(layer) is torch.nn.LayerNorm:  # host quirk: LayerNorm weights ~ N(0, 0.01), not ones
            assert abs(layer.weight.std().item() - 0.01) < 0.002
    for w in _linear_weights(module):
        fan_out, fan_in = w.shape
        if init == "Normal":
            std, bound = 0.01, None
        elif init == "XavierUniform":
            bound = math.sqrt(6 / (fan_in + fan_out))
            std = bound / math.sqrt(3)
        elif init == "XavierNormal":
            std, bound = math.sqrt(2 / (fan_in + fan_out)), None
        elif init == "KaimingUniform":  # gain sqrt(2) for relu and for leaky_relu with the default a=0
            bound = math.sqrt(2) * math.sqrt(3 / fan_in)
            std = bound / math.sqrt(3)
        else:
            std, bound = math.sqrt(2) / math.sqrt(fan_in), None
        assert abs(w.std().item() / std - 1) < 0.02, (init, w.std().item(), std)
        assert abs(w.mean().item()) < std * 0.02
        if bound is not None:
            assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ls", [(2, 2, 1), (1, 2, 2), (1,), (1, 0, 1)])
def test_bad_layer_structure_is_refused(ls):
    with pytest.raises(AlchemyError, match="layer structure"):
        HypernetworkModule(8, Architecture(ls, "relu"))


def test_unknown_activation_and_init_are_refused():
    with pytest.raises(AlchemyError, match="nosuch"):
        HypernetworkModule(8, Architecture((1, 2, 1), "nosuch"))
    with pytest.raises(AlchemyError, match="threshold"):
        HypernetworkModule(8, Architecture((1, 2, 1), "threshold"))
    with pytest.raises(AlchemyError, match="Uniform"):
        HypernetworkModule(8, Architecture((1, 2, 1), "relu"), weight_init="Uniform")


def test_bad_dropout_structure_is_refused():
    with pytest.raises(AlchemyError, match="below 1"):
        HypernetworkModule(8, Architecture((1, 2, 1), dropout_structure=(0, 1.0, 0)))
    with pytest.raises(AlchemyError, match="as many entries"):
        HypernetworkModule(8, Architecture((1, 2, 1), dropout_structure=(0, 0.1)))


def test_parse_dropout_structure_follows_the_host():
    assert parse_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]
    assert parse_dropout_structure([1, 2, 4, 2, 1], True, False) == [0, 0.3, 0.3, 0, 0]


def test_hypernetwork_train_eval_and_multiplier():
    hn = Hypernetwork.create("h", [8, 16], Architecture((1, 2, 1), "relu"))
    assert hn.sizes == [8, 16]
    assert hn.arch.dropout_structure == (0, 0, 0)
    assert all(not p.requires_grad for p in hn.parameters())
    hn.train()
    assert all(p.requires_grad for p in hn.parameters()) and all(m.training for m in hn.modules())
    hn.eval().set_multiplier(0.3)
    assert all(m.multiplier == 0.3 and not m.training for m in hn.modules())
    assert len(hn.parameters()) == 2 * 2 * 4
