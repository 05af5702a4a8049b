"""The attention patch computes to_k(hn_k(context)) / to_v(hn_v(context)) on self- and cross-attention of a
matching width, chains hypernetworks in order, and comes off leaving bit-identical outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from extensions_lib.errors import AlchemyError
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
from extensions_lib.hypernetworks.patch import apply_hypernetworks

QUERY, CONTEXT, HEADS, HEAD_DIM = 32, 48, 2, 16


def randomised(hn: Hypernetwork, seed: int) -> Hypernetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return hn


def make_hn(name, sizes, seed, activation="relu"):
    return randomised(Hypernetwork.create(name, sizes, Architecture((1, 2, 1), activation)), seed)


@pytest.fixture()
def layers():
    torch.manual_seed(0)
    self_attn = Attention(query_dim=QUERY, heads=HEADS, dim_head=HEAD_DIM).eval()
    cross_attn = Attention(query_dim=QUERY, cross_attention_dim=CONTEXT, heads=HEADS, dim_head=HEAD_DIM).eval()
    return [("down.attn1", self_attn), ("down.attn2", cross_attn)]


@pytest.fixture()
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, QUERY, generator=g), torch.randn(2, 5, CONTEXT, generator=g)


def manual_attention(attn, x, context, k_fn, v_fn):
    """Plain multi-head attention with the hypernetwork applied to k's and v's context only.

    Projections go through F.linear on the weights, so hooks on the modules (the patch) cannot act here.
    """
    q = F.linear(x, attn.to_q.weight, attn.to_q.bias)
    k = F.linear(k_fn(context), attn.to_k.weight, attn.to_k.bias)
    v = F.linear(v_fn(context), attn.to_v.weight, attn.to_v.bias)
    b, n, _ = q.shape
    q, k, v = (t.reshape(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)  # to_out[1] is dropout (eval: identity)


def run(attn, x, context):
    return attn(x) if context is None else attn(x, encoder_hidden_states=context)


def test_self_and_cross_attention_get_their_widths_modules(layers, inputs):
    x, ctx = inputs
    hn = make_hn("a", [QUERY, CONTEXT], seed=2)
    with apply_hypernetworks([(hn, 0.8)], layers) as patch:
        assert set(patch.applied) == {"down.attn1", "down.attn2"} and patch.unused == []
        for (name, attn), context in zip(layers, (None, ctx)):
            width = QUERY if context is None else CONTEXT
            k_mod, v_mod = hn.layers[width]
            source = x if context is None else context  # self-attention's context is x itself
            with torch.no_grad():
                want = manual_attention(attn, x, source, lambda c: k_mod(c, 0.8), lambda c: v_mod(c, 0.8))
                got = run(attn, x, context)
                plain = manual_attention(attn, x, source, lambda c: c, lambda c: c)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, plain, atol=1e-4), name  # it really acts


def test_only_k_and_v_are_hooked(layers):
    hn = make_hn("a", [QUERY, CONTEXT], seed=2)
    with apply_hypernetworks([(hn, 1.0)], layers):
        for _, attn in layers:
            assert len(attn.to_k._forward_pre_hooks) == 1 and len(attn.to_v._forward_pre_hooks) == 1
            assert len(attn.to_q._forward_pre_hooks) == 0 and len(attn.to_out[0]._forward_pre_hooks) == 0


def test_strength_zero_and_unpatch_are_bit_identical(layers, inputs):
    x, ctx = inputs
    with torch.no_grad():
        before = [run(attn, x, c) for (_, attn), c in zip(layers, (None, ctx))]
    originals = [(attn.to_k, attn.to_v, attn.to_q) for _, attn in layers]
    state_keys = [list(attn.state_dict()) for _, attn in layers]
    hn = make_hn("a", [QUERY, CONTEXT], seed=3)

    with apply_hypernetworks([(hn, 0.0)], layers), torch.no_grad():
        for ((_, attn), c), b in zip(zip(layers, (None, ctx)), before):
            assert torch.equal(run(attn, x, c), b)

    patch = apply_hypernetworks([(hn, 1.0)], layers)
    with torch.no_grad():
        assert not torch.equal(run(layers[1][1], x, ctx), before[1])
    assert [list(attn.state_dict()) for _, attn in layers] == state_keys  # nothing registered in the model
    patch.unpatch()
    patch.unpatch()  # idempotent
    assert not patch.active
    for (_, attn), objs in zip(layers, originals):
        assert (attn.to_k, attn.to_v, attn.to_q) == objs and all(a is b for a, b in zip((attn.to_k, attn.to_v, attn.to_q), objs))
        assert len(attn.to_k._forward_pre_hooks) == 0 and len(attn.to_v._forward_pre_hooks) == 0
    with torch.no_grad():
        for ((_, attn), c), b in zip(zip(layers, (None, ctx)), before):
            assert torch.equal(run(attn, x, c), b)


def test_zero_initialised_output_layer_is_bit_identical(layers, inputs):
    x, ctx = inputs
    hn = make_hn("z", [QUERY, CONTEXT], seed=4)
    with torch.no_grad():
        for m in hn.modules():
            m.linear[-1].weight.zero_()
            m.linear[-1].bias.zero_()
        before = run(layers[1][1], x, ctx)
        with apply_hypernetworks([(hn, 1.0)], layers):
            assert torch.equal(run(layers[1][1], x, ctx), before)


def test_two_hypernetworks_chain_in_order_with_their_own_multipliers(layers, inputs):
    x, ctx = inputs
    first, second = make_hn("first", [CONTEXT], seed=5), make_hn("second", [CONTEXT, 640], seed=6, activation="tanh")
    attn = layers[1][1]
    fk, fv = first.layers[CONTEXT]
    sk, sv = second.layers[CONTEXT]
    with torch.no_grad():
        want = manual_attention(attn, x, ctx, lambda c: sk(fk(c, 0.5), 1.5), lambda c: sv(fv(c, 0.5), 1.5))
        reversed_order = manual_attention(attn, x, ctx, lambda c: fk(sk(c, 1.5), 0.5), lambda c: fv(sv(c, 1.5), 0.5))
        with apply_hypernetworks([(first, 0.5), (second, 1.5)], layers) as patch:
            got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, reversed_order, atol=1e-4)
    assert patch.applied == {"down.attn2": ["first", "second"]}
    assert patch.unused == [("second", 640)]  # a width this model lacks is listed, not an error
    assert "second width 640" in patch.summary()


def test_sizes_absent_from_the_model_leave_it_untouched(layers, inputs):
    x, ctx = inputs
    hn = make_hn("sd2only", [1024], seed=7)
    with torch.no_grad():
        before = run(layers[1][1], x, ctx)
        with apply_hypernetworks([(hn, 1.0)], layers) as patch:
            assert patch.applied == {} and patch.unused == [("sd2only", 1024)]
            assert torch.equal(run(layers[1][1], x, ctx), before)


def test_training_mode_gradients_reach_only_the_hypernetwork(layers, inputs):
    x, ctx = inputs
    hn = make_hn("t", [CONTEXT], seed=8).train()
    attn = layers[1][1]
    for p in attn.parameters():
        p.requires_grad_(False)
    with apply_hypernetworks([(hn, 0.0)], layers):  # multiplier ignored while training, as in the host
        attn(x, encoder_hidden_states=ctx).square().mean().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in hn.parameters())
    assert all(p.grad is None for p in attn.parameters())


def test_half_precision_model_with_float32_hypernetwork(layers, inputs):
    x, ctx = inputs
    attn = layers[1][1].to(torch.bfloat16)
    hn = make_hn("a", [CONTEXT], seed=9)
    k_mod, v_mod = hn.layers[CONTEXT]
    with torch.no_grad(), apply_hypernetworks([(hn, 1.0)], layers):
        got = attn(x.bfloat16(), encoder_hidden_states=ctx.bfloat16())
        want = manual_attention(attn, x.bfloat16(), ctx.bfloat16(), lambda c: k_mod(c.float()).bfloat16(),
                                lambda c: v_mod(c.float()).bfloat16())
    assert got.dtype == torch.bfloat16 and next(hn.layers[CONTEXT][0].parameters()).dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_bad_multiplier_is_refused(layers):
    with pytest.raises(AlchemyError, match="multiplier"):
        apply_hypernetworks([(make_hn("a", [QUERY], 1), float("nan"))], layers)


def test_tiny_unet_patch_and_undo(tiny_model):
    model = tiny_model("sd1")
    attention = model.attention_modules()
    widths = sorted({attn.to_k.in_features for _, attn in attention})
    hn = make_hn("tiny", [*widths, 1280], seed=10)
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, model.context_dim, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        before = model.predict(latents, t, cond)
        with apply_hypernetworks([(hn, 1.0)], attention) as patch:
            patched = model.predict(latents, t, cond)
        after = model.predict(latents, t, cond)
        with apply_hypernetworks([(hn, 0.0)], attention):
            zero = model.predict(latents, t, cond)
    assert len(patch.applied) == len(attention)  # self-attention (32/64) and cross-attention (32) layers
    assert patch.unused == [("tiny", 1280)]
    assert not torch.allclose(patched, before, atol=1e-5)
    assert torch.equal(after, before) and torch.equal(zero, before)
