"""The WebUI model adapter on SD1/SD2-shaped stand-in models: it must compute what the standalone backend
computes from the same checkpoint, under --medvram too, and patches through it must undo bit for bit."""
from __future__ import annotations

import pytest
import torch

from extensions_lib.host.webui_adapter import ModelWatch, NoModelLoaded, WebUIModelAdapter
from extensions_lib.prompt import encode_prompts
from webui_standin.harness import standin_host

FAMILIES = ["sd1", "sd2", "sd2-v"]


def same(a, b):
    """Equal up to CPU-kernel noise: two model instances with identical weights can differ by ~1e-7 because
    oneDNN/MKL pick code paths by buffer alignment. Bit-identity is asserted only within one instance."""
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.fixture(params=[False, True], ids=["plain", "medvram"])
def medvram(request):
    return request.param


def _host_adapter(host, checkpoint):
    model = host.load_model(checkpoint)
    return WebUIModelAdapter(model, host.devices.device)


def _tokens(adapter, texts):
    from extensions_lib.prompt import SpecialTokens, chunk_prompt

    ids = SpecialTokens.of(adapter.text_encoders[0])
    return torch.tensor([chunk_prompt(adapter.tokenizer, t, ids)[0].tokens for t in texts])


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_standalone(tmp_path, tiny_checkpoint, tiny_model, family, medvram):
    ref = tiny_model(family)
    with standin_host(tmp_path, medvram=medvram) as host:
        ad = _host_adapter(host, tiny_checkpoint(family))
        assert (ad.family, ad.prediction_type, ad.context_dim) == (ref.family, ref.prediction_type, ref.context_dim)
        assert ad.checkpoint_hash == ref.checkpoint_hash and ad.checkpoint_name == ref.checkpoint_name
        assert torch.equal(ad.alphas_cumprod, ref.alphas_cumprod)
        info, ref_info = ad.text_encoders[0], ref.text_encoders[0]
        assert (info.width, info.id_start, info.id_end, info.id_pad, info.comma_token) == \
            (ref_info.width, ref_info.id_start, ref_info.id_end, ref_info.id_pad, ref_info.comma_token)
        texts = ["a photo of a cat, BREAK & dog", "  mixed CASE &amp; text  "]
        assert ad.tokenizer.tokenize(texts) == ref.tokenizer.tokenize(texts)

        tokens = _tokens(ad, texts)
        for clip_skip in (1, 2) if family == "sd1" else (1,):
            got, want = ad.encode_token_chunks(tokens, clip_skip), ref.encode_token_chunks(tokens, clip_skip)
            if family == "sd1":  # same transformers module class on both sides
                same(got, want)
            else:  # open_clip's tower vs the backend's converted CLIPTextModel: same maths, other kernels
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
        dist, ref_dist = ad.encode_images(images), ref.encode_images(images)
        same(dist.mean, ref_dist.mean)
        same(dist.std, ref_dist.std)
        assert dist.scale == ref_dist.scale
        latents = torch.randn(1, 4, 8, 8, generator=g)
        same(ad.decode_latents(latents), ref.decode_latents(latents))

        cond = torch.randn(2, 77, ad.context_dim, generator=g)
        noisy = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([10, 900])
        same(ad.predict(noisy, t, cond), ref.predict(noisy, t, cond))
        assert sorted(m.to_k.in_features for _, m in ad.attention_modules()) == \
            sorted(m.to_k.in_features for _, m in ref.attention_modules())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_prompt_encoding_matches_host_wrapper(tmp_path, tiny_checkpoint, family, medvram):
    """Our prompt pipeline over the adapter gives what the host's own wrapper gives for a prompt (same
    chunking, padding id, layer, emphasis), including the host's Clip skip setting on SD1."""
    with standin_host(tmp_path, medvram=medvram) as host:
        ad = _host_adapter(host, tiny_checkpoint(family))
        prompts = ["a (red:1.3) cat, " * 30, "plain"]
        with torch.no_grad():
            torch.testing.assert_close(encode_prompts(ad, prompts), ad.sd_model.cond_stage_model(prompts),
                                       rtol=0, atol=0)
            if family == "sd1":
                host.shared.opts.CLIP_stop_at_last_layers = 2
                torch.testing.assert_close(encode_prompts(ad, prompts, clip_skip=2),
                                           ad.sd_model.cond_stage_model(prompts), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_medvram_weights_are_only_read_through_the_hosts_hook(tmp_path, tiny_checkpoint, family):
    """Under --medvram the text encoder waits offloaded (simulated: its weights are unreadable meta tensors);
    reading the adapter's text encoders or use("text_encoder") runs the host's own hook first."""
    with standin_host(tmp_path, medvram=True) as host:
        ad = _host_adapter(host, tiny_checkpoint(family))
        text = ad.sd_model.cond_stage_model.wrapped  # the part the host parks (ldm's encoder under its wrapper)
        ad.predict(torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 77, ad.context_dim))
        assert host.lowvram.is_offloaded(text)
        weight = ad.text_encoders[0].token_embedding.weight
        assert not host.lowvram.is_offloaded(text) and not weight.is_meta
        with ad.use("vae"):
            assert host.lowvram.moves[-1] == "AutoencoderKL" and host.lowvram.is_offloaded(text)
        with ad.use("text_encoder"):
            assert host.lowvram.moves[-1] == type(text).__name__


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_hypernetwork_patch_through_adapter_undoes_bit_identically(tmp_path, tiny_checkpoint, tiny_model, family,
                                                                    medvram):
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
    from extensions_lib.hypernetworks.patch import apply_hypernetworks

    ref = tiny_model(family)
    widths = sorted({m.to_k.in_features for _, m in ref.attention_modules()})
    torch.manual_seed(0)
    hn = Hypernetwork.create("hn", widths, Architecture(layer_structure=[1, 2, 1], activation_func="relu"))
    g = torch.Generator().manual_seed(1)
    noisy, cond, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, ref.context_dim, generator=g), torch.tensor([500])
    with standin_host(tmp_path, medvram=medvram) as host:
        ad = _host_adapter(host, tiny_checkpoint(family))
        before = ad.predict(noisy, t, cond)
        patch = apply_hypernetworks([(hn, 0.7)], ad.attention_modules())
        try:
            patched = ad.predict(noisy, t, cond)
            ref_patch = apply_hypernetworks([(hn, 0.7)], ref.attention_modules())
            try:
                same(patched, ref.predict(noisy, t, cond))
            finally:
                ref_patch.unpatch()
        finally:
            patch.unpatch()
        assert not torch.equal(patched, before)
        assert torch.equal(ad.predict(noisy, t, cond), before)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_embedding_patch_nests_inside_host_wrapper_and_undoes(tmp_path, tiny_checkpoint, family):
    """Our embedding patch wraps the host's token embedding where the host's EmbeddingsWithFixes holds it:
    inert for host prompts, active in ours, removed without a trace."""
    from extensions_lib.embeddings.matcher import EmbeddingMatcher
    from extensions_lib.embeddings.patch import patch_text_encoders
    from extensions_lib.formats.embedding import Embedding

    with standin_host(tmp_path) as host:
        ad = _host_adapter(host, tiny_checkpoint(family))
        host_ewf = ad.sd_model.cond_stage_model.wrapped
        host_ewf = host_ewf.model.token_embedding if family == "sd2" else host_ewf.transformer.text_model.embeddings.token_embedding
        inner = host_ewf.wrapped
        emb = Embedding("zqxstyle", torch.randn(2, ad.context_dim))
        matcher = EmbeddingMatcher(ad.tokenizer, [emb])
        prompts = ["a zqxstyle cat"]
        with torch.no_grad():
            plain = encode_prompts(ad, prompts)
            host_before = ad.sd_model.cond_stage_model(prompts)
            patch = patch_text_encoders(ad)
            try:
                assert host_ewf.wrapped is not inner  # nested inside the host's wrapper
                with_emb = encode_prompts(ad, prompts, matcher=matcher)
                assert torch.equal(ad.sd_model.cond_stage_model(prompts), host_before)
            finally:
                patch.unpatch()
            assert host_ewf.wrapped is inner
            assert torch.equal(encode_prompts(ad, prompts), plain)
        assert not torch.equal(with_emb, plain)


def test_model_watch_notices_switches_without_callbacks(tmp_path, tiny_checkpoint):
    with standin_host(tmp_path) as host:
        watch = ModelWatch(lambda: host.sd_models.model_data.sd_model, host.devices.device)
        with pytest.raises(NoModelLoaded, match="choose a checkpoint"):
            watch.adapter()
        host.script_callbacks.on_model_loaded(watch.model_loaded)
        first = host.load_model(tiny_checkpoint("sd1"))
        a1 = watch.adapter()
        token = watch.token()
        assert watch.adapter() is a1 and watch.changed(token) is None
        second = host.load_model(tiny_checkpoint("sd2"))
        assert watch.adapter().family == "sd2"
        assert watch.changed(token) == "another checkpoint was selected"
        host.sd_models.switch_to_cached(first)  # RAM cache: no callback fires
        assert watch.adapter().sd_model is first and watch.adapter().family == "sd1"
        token = watch.token()
        host.sd_models.reload_model_weights(tiny_checkpoint("sd1"))  # same object, new weights
        assert watch.changed(token) == "the checkpoint was reloaded"
        assert second is not first


def _sdxl_shaped(tokenizer):
    """The parts of an SDXL model (sgm ``DiffusionEngine`` after the host's hijack) the adapter reads."""
    from types import SimpleNamespace

    from torch import nn

    class HostEWF(nn.Module):  # the host's EmbeddingsWithFixes: holds the embedding as .wrapped
        def __init__(self, wrapped, key):
            super().__init__()
            self.wrapped, self.textual_inversion_key = wrapped, key

    clip_l = SimpleNamespace(transformer=SimpleNamespace(text_model=SimpleNamespace(
        embeddings=SimpleNamespace(token_embedding=HostEWF(nn.Embedding(49408, 12), "clip_l")))))
    clip_g = SimpleNamespace(model=SimpleNamespace(token_embedding=HostEWF(nn.Embedding(49408, 20), "clip_g")))
    conditioner = nn.Module()
    conditioner.embedders = [SimpleNamespace(wrapped=clip_l, id_start=49406, id_end=49407, id_pad=49407,
                                             comma_token=267),
                             SimpleNamespace(wrapped=clip_g, id_start=49406, id_end=49407, id_pad=0, comma_token=267)]
    conditioner.tokenize = tokenizer.tokenize
    model = SimpleNamespace(is_sdxl=True, conditioner=conditioner, model=nn.Linear(1, 1), first_stage_model=nn.Linear(1, 1),
                            alphas_cumprod=torch.linspace(0.99, 0.01, 1000), scale_factor=0.13025, lowvram=False)
    return model


def test_sdxl_is_described_for_embeddings_and_refused_for_the_rest(tmp_path, tiny_model):
    from extensions_lib.embeddings.create import create_embedding
    from extensions_lib.formats.embedding import read_embedding
    from extensions_lib.host.webui_adapter import UnsupportedModel

    ad = WebUIModelAdapter(_sdxl_shaped(tiny_model("sd1").tokenizer), "cpu")
    assert (ad.family, ad.context_dim, ad.vae_scale_factor) == ("sdxl", 2048, 0.13025)
    assert [(i.key, i.width, i.id_pad) for i in ad.text_encoders] == [("clip_l", 12, 49407), ("clip_g", 20, 0)]
    path = create_embedding(ad, "xlstyle", "cat", 2, directory=tmp_path)
    emb = read_embedding(path)  # the host's SDXL form: one tensor per encoder, in .safetensors
    assert path.suffix == ".safetensors" and {k: tuple(v.shape) for k, v in emb.vectors.items()} == \
        {"clip_l": (2, 12), "clip_g": (2, 20)}
    with pytest.raises(UnsupportedModel, match="SDXL"):
        ad.encode_token_chunks(torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(UnsupportedModel, match="SDXL"):
        ad.predict(torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 77, 2048))


def test_the_standin_leaves_the_unet_trainable_like_the_real_host(tmp_path, tiny_checkpoint):
    """ldm freezes only its first stage and cond stage; the WebUI leaves the UNet's requires_grad=True."""
    with standin_host(tmp_path) as host:
        model = host.load_model(tiny_checkpoint("sd1"))
        assert all(p.requires_grad for p in model.model.diffusion_model.parameters())
        assert not any(p.requires_grad for p in model.first_stage_model.parameters())
        assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
