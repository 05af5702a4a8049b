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


def count_calls(hn: Hypernetwork) -> list[int]:
    """A list that counts the forward calls of each module of `hn` (k, v per width, in order)."""
    counts = [0] * len(list(hn.modules()))
    for i, module in enumerate(hn.modules()):
        module.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


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


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_only_k_and_v_are_patched(layers, activation):
    hn = make_hn("a", [QUERY, CONTEXT], seed=2, activation=activation)
    with apply_hypernetworks([(hn, 1.0)], layers):
        for _, attn in layers:
            assert "forward" in vars(attn.to_k) and "forward" in vars(attn.to_v)
            assert "forward" not in vars(attn.to_q) and "forward" not in vars(attn.to_out[0])
    for _, attn in layers:
        assert "forward" not in vars(attn.to_k) and "forward" not in vars(attn.to_v)


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_strength_zero_and_unpatch_are_bit_identical(layers, inputs, activation):
    x, ctx = inputs
    with torch.no_grad():
        before = [run(attn, x, c) for (_, attn), c in zip(layers, (None, ctx))]
    originals = [(attn.to_k, attn.to_v, attn.to_q) for _, attn in layers]
    state_keys = [list(attn.state_dict()) for _, attn in layers]
    hn = make_hn("a", [QUERY, CONTEXT], seed=3, activation=activation)

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
        assert "forward" not in vars(attn.to_k) and "forward" not in vars(attn.to_v)
    with torch.no_grad():
        for ((_, attn), c), b in zip(zip(layers, (None, ctx)), before):
            assert torch.equal(run(attn, x, c), b)


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_zero_initialised_output_layer_is_bit_identical(layers, inputs, activation):
    x, ctx = inputs
    hn = make_hn("z", [QUERY, CONTEXT], seed=4, activation=activation)
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


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_training_mode_gradients_reach_only_the_hypernetwork(layers, inputs, activation):
    x, ctx = inputs
    hn = make_hn("t", [CONTEXT], seed=8, activation=activation).train()
    attn = layers[1][1]
    for p in attn.parameters():
        p.requires_grad_(False)
    calls = count_calls(hn)
    with apply_hypernetworks([(hn, 0.0)], layers):  # multiplier ignored while training, as in the host
        attn(x, encoder_hidden_states=ctx).square().mean().backward()
    assert calls == [1, 1]  # never folded while training: the modules themselves ran
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


# ---- folding affine chains into the projections, and the context cache of the hooked path -------------

def assert_rel_close(got, want, rel=1e-5):
    """Equal up to float32 rounding: the largest deviation relative to the largest magnitude (folding reorders
    the sums, so elements near zero differ by more than an element-wise relative tolerance allows)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    error = float((got - want).abs().max() / want.abs().max())
    assert error <= rel, error


def chained(mods_and_mults):
    """x -> each (module, multiplier) in order, computed by the modules themselves."""
    def fn(c):
        for module, mult in mods_and_mults:
            c = module(c, mult)
        return c
    return fn


@pytest.mark.parametrize("mults", [(1.0,), (0.35,), (-0.8,), (2.5,), (0.5, 1.5), (1.0, -0.3)])
def test_affine_chains_fold_and_equal_the_modules(layers, inputs, mults):
    x, ctx = inputs
    hns = [make_hn(f"lin{i}", [QUERY, CONTEXT], seed=20 + i, activation="linear") for i in range(len(mults))]
    calls = [count_calls(hn) for hn in hns]
    with apply_hypernetworks(list(zip(hns, mults)), layers), torch.no_grad():
        for (name, attn), context in zip(layers, (None, ctx)):
            width = QUERY if context is None else CONTEXT
            source = x if context is None else context
            k_fn = chained([(hn.layers[width][0], m) for hn, m in zip(hns, mults)])
            v_fn = chained([(hn.layers[width][1], m) for hn, m in zip(hns, mults)])
            got = run(attn, x, context)
            assert all(count == 0 for c in calls for count in c)  # folded: the modules never ran
            want = manual_attention(attn, x, source, k_fn, v_fn)
            assert_rel_close(got, want)
            assert not torch.allclose(got, manual_attention(attn, x, source, lambda c: c, lambda c: c), atol=1e-4)
            for c in calls:
                c[:] = [0] * len(c)


def test_fold_follows_weight_edits_multiplier_changes_and_mode_switches(layers, inputs):
    x, ctx = inputs
    attn = layers[1][1]
    hn = make_hn("lin", [CONTEXT], seed=30, activation="linear")
    k_mod, v_mod = hn.layers[CONTEXT]

    def reference(mult):
        return manual_attention(attn, x, ctx, lambda c: k_mod(c, mult), lambda c: v_mod(c, mult))

    with torch.no_grad():
        with apply_hypernetworks([(hn, 0.5)], layers):
            assert_rel_close(attn(x, encoder_hidden_states=ctx), reference(0.5))
            k_mod.linear[0].weight.mul_(-2.0)  # e.g. an optimizer step between two previews
            assert_rel_close(attn(x, encoder_hidden_states=ctx), reference(0.5))
            attn.to_v.weight.add_(0.1)  # the projection itself changed (e.g. a LoRA merged into it)
            assert_rel_close(attn(x, encoder_hidden_states=ctx), reference(0.5))
        with apply_hypernetworks([(hn, 1.5)], layers):  # a new strength takes effect at once
            assert_rel_close(attn(x, encoder_hidden_states=ctx), reference(1.5))
    with apply_hypernetworks([(hn, 0.5)], layers):
        with torch.no_grad():
            folded = attn(x, encoder_hidden_states=ctx)
        hn.train()  # training ignores the multiplier (1) and needs the real graph
        loss = attn(x, encoder_hidden_states=ctx).square().mean()
        loss.backward()
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in hn.parameters())
        hn.eval()
        with torch.no_grad():
            assert torch.equal(attn(x, encoder_hidden_states=ctx), folded)  # back to the same fold
    with torch.no_grad():
        assert_rel_close(loss, reference(1.0).square().mean())


def test_gradients_needed_by_parameters_use_the_modules(layers, inputs):
    # An eval-mode hypernetwork whose parameters require grad (or a projection that does) must not be
    # folded under autograd: the gradient has to reach those parameters.
    x, ctx = inputs
    attn = layers[1][1]
    hn = make_hn("lin", [CONTEXT], seed=31, activation="linear")
    for p in hn.parameters():
        p.requires_grad_(True)
    with apply_hypernetworks([(hn, 0.7)], layers):
        attn(x, encoder_hidden_states=ctx).sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in hn.parameters())


def test_two_patches_nest_in_order_and_come_off_in_any_order(layers, inputs):
    x, ctx = inputs
    attn = layers[1][1]
    first = make_hn("first", [CONTEXT], seed=32, activation="linear")
    second = make_hn("second", [CONTEXT], seed=33, activation="relu")
    with torch.no_grad():
        before = attn(x, encoder_hidden_states=ctx)
        want = manual_attention(attn, x, ctx, chained([(first.layers[CONTEXT][0], 0.6), (second.layers[CONTEXT][0], 1.2)]),
                                chained([(first.layers[CONTEXT][1], 0.6), (second.layers[CONTEXT][1], 1.2)]))
        outer = apply_hypernetworks([(first, 0.6)], layers)
        inner = apply_hypernetworks([(second, 1.2)], layers)
        assert_rel_close(attn(x, encoder_hidden_states=ctx), want)
        outer.unpatch()
        fk, fv = second.layers[CONTEXT]
        assert_rel_close(attn(x, encoder_hidden_states=ctx),
                         manual_attention(attn, x, ctx, lambda c: fk(c, 1.2), lambda c: fv(c, 1.2)))
        inner.unpatch()
        assert "forward" not in vars(attn.to_k) and torch.equal(attn(x, encoder_hidden_states=ctx), before)


def test_context_cache_computes_each_width_once_and_never_goes_stale(inputs):
    x, ctx = inputs
    torch.manual_seed(0)
    cross = [(f"attn2.{i}", Attention(query_dim=QUERY, cross_attention_dim=CONTEXT, heads=HEADS,
                                      dim_head=HEAD_DIM).eval()) for i in range(3)]
    hn = make_hn("relu", [CONTEXT], seed=34)
    k_mod, v_mod = hn.layers[CONTEXT]
    calls = count_calls(hn)

    def check(context):
        # Each clone is a new tensor, so a miss: the same computation without the cache, hence bit-equal.
        uncached = [attn(x, encoder_hidden_states=context.clone()) for _, attn in cross]
        for (_, attn), want in zip(cross, uncached):
            assert torch.equal(attn(x, encoder_hidden_states=context), want)
            assert_rel_close(want, manual_attention(attn, x, context, k_mod, v_mod))

    with apply_hypernetworks([(hn, 1.0)], cross), torch.no_grad():
        check(ctx)
        n = list(calls)
        for _, attn in cross:
            attn(x, encoder_hidden_states=ctx)
        assert calls == n  # every layer of the width reused the one computation for this context
        ctx.mul_(0.5)  # changed in place: recomputed
        check(ctx)
        check(ctx.clone())  # another tensor with the same values: recomputed, same result
        k_mod.linear[0].weight.add_(0.05)  # the hypernetwork changed: recomputed
        check(ctx)
        n = list(calls)
        check(torch.randn_like(ctx))
        assert calls[0] > n[0]
    calls[:] = [0, 0]
    with apply_hypernetworks([(hn, 1.0)], cross), torch.enable_grad():  # a graph is needed: no cache
        k_mod.requires_grad_(True)
        for _, attn in cross:
            attn(x, encoder_hidden_states=ctx).sum().backward()
        assert calls == [3, 1]  # k (its graph is needed) ran in every layer; v, needing none, once
        assert k_mod.linear[0].weight.grad is not None


def test_tiny_unet_fold_equals_the_modules(tiny_model):
    model = tiny_model("sd1")
    attention = model.attention_modules()
    widths = sorted({attn.to_k.in_features for _, attn in attention})
    hns = [make_hn("a", widths, seed=40, activation="linear"), make_hn("b", widths, seed=41, activation="linear")]
    g = torch.Generator().manual_seed(12)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, model.context_dim, generator=g)
    t = torch.tensor([500])
    for chosen in ([(hns[0], 0.8)], [(hns[0], 0.8), (hns[1], -1.3)]):
        calls = count_calls(hns[0])
        with torch.no_grad():
            before = model.predict(latents, t, cond)
        with apply_hypernetworks(chosen, attention):
            with torch.no_grad():
                folded = model.predict(latents, t, cond)
            assert sum(calls) == 0
            for hn, _ in chosen:  # gradients wanted by the hypernetwork: it runs as modules
                for p in hn.parameters():
                    p.requires_grad_(True)
            hooked = model.predict(latents, t, cond).detach()
            assert sum(calls) > 0
            for hn, _ in chosen:
                hn.eval()
        assert_rel_close(folded, hooked, rel=3e-5)  # float32 rounding, compounded through the whole UNet
        assert not torch.allclose(folded, before, atol=1e-4)
        with torch.no_grad():
            assert torch.equal(model.predict(latents, t, cond), before)


def test_half_precision_model_folds_close_to_the_modules(layers, inputs):
    x, ctx = inputs
    attn = layers[1][1].to(torch.bfloat16)
    hn = make_hn("a", [CONTEXT], seed=42, activation="linear")
    k_mod, v_mod = hn.layers[CONTEXT]
    with torch.no_grad(), apply_hypernetworks([(hn, 1.0)], layers):
        got = attn(x.bfloat16(), encoder_hidden_states=ctx.bfloat16())
        want = manual_attention(attn, x.bfloat16(), ctx.bfloat16(), lambda c: k_mod(c.float()).bfloat16(),
                                lambda c: v_mod(c.float()).bfloat16())
    assert got.dtype == torch.bfloat16 and attn.to_k.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_fold_made_under_inference_mode_is_not_reused_outside_it(layers, inputs):
    x, ctx = inputs
    attn = layers[1][1]
    hn = make_hn("lin", [CONTEXT], seed=43, activation="linear")
    with apply_hypernetworks([(hn, 0.9)], layers):
        with torch.inference_mode():
            inside = attn(x, encoder_hidden_states=ctx)
        context = ctx.clone().requires_grad_(True)
        outside = attn(x, encoder_hidden_states=context)
        outside.sum().backward()  # would fail on weights folded as inference tensors
    assert context.grad is not None
    assert_rel_close(outside.detach(), inside)
