"""Applying aesthetic embeddings in the standalone backend (tiny SD1 and SD2 models)."""
from __future__ import annotations

import copy

import pytest
import torch

from extensions_lib.aesthetic.file import AestheticEmbedding, vector_digest
from extensions_lib.aesthetic.options import AestheticOptions
from extensions_lib.aesthetic.personalise import Personaliser, Settings, slerp
from extensions_lib.aesthetic.standalone import SD2_PROJECTION_KEY, StandaloneAesthetic, standalone_tower
from extensions_lib.errors import AlchemyError
from extensions_lib.prompt import encode_prompts
from tests.aesthetic_fakes import make_hf_clip


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return make_hf_clip(tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14")


def _embedding(dim: int, seed: int = 1) -> AestheticEmbedding:
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return AestheticEmbedding("style", vector, vector_digest(vector))


def _projection(model, family, hf_clip):
    if family == "sd2":
        return model.extras[SD2_PROJECTION_KEY].float()
    from safetensors.torch import load_file

    return load_file(str(hf_clip / "model.safetensors"))["text_projection.weight"].t()


def _reference_features(model, params, tokens, projection):
    """Independent: transformers' own CLIPTextModel forward with the tuned weights loaded by name."""
    encoder = copy.deepcopy(model.text_encoder)
    state = encoder.state_dict()
    for name, value in params.items():
        kind, _, rest = name.partition(".")
        key = {"pos": "text_model.embeddings.position_embedding.weight"}.get(name) or \
            {"enc": "text_model.encoder.", "ln": "text_model.final_layer_norm."}[kind] + rest
        assert key in state
        state[key] = value
    encoder.load_state_dict(state)
    with torch.no_grad():
        out = encoder(input_ids=tokens, output_hidden_states=True)
    return out.pooler_output @ projection, out, encoder


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_similarity_rises_with_steps_checked_by_transformers(tiny_model, hf_clip, family):
    model = tiny_model(family)
    tower = standalone_tower(model, hf_clip)
    projection = _projection(model, family, hf_clip)
    embedding = _embedding(tower.dim)
    target = embedding.normalised()[None]
    tokens = tower.chunk(model.tokenizer.tokenize(["a photo of a cat"])[0])
    embeds = tower.embed(tokens)
    personaliser = Personaliser()
    similarities = []
    for steps in (0, 3, 10):
        settings = Settings(steps=steps, lr=1e-3)
        zn, params, trace = personaliser.optimise_row(tower, tokens, embeds, target, settings)
        features, out, tuned = _reference_features(model, params, tokens, projection)
        similarity = float(torch.nn.functional.cosine_similarity(features, target))
        assert similarity == pytest.approx(trace[-1], abs=1e-5)
        # the conditioning handed to the UNet is the tuned encoder's (SD2: penultimate layer + final norm)
        expected = out.last_hidden_state if family == "sd1" else \
            tuned.text_model.final_layer_norm(out.hidden_states[-2])
        torch.testing.assert_close(zn, expected[0], rtol=1e-4, atol=1e-5)
        similarities.append(similarity)
    assert similarities[0] < similarities[1] < similarities[2]
    assert all(b >= a - 1e-6 for a, b in zip(trace, trace[1:]))


def _encode(model, aesthetic: StandaloneAesthetic | None, prompt: str, negative: str = ""):
    if aesthetic is None:
        return encode_prompts(model, [prompt]), encode_prompts(model, [negative])
    fn = aesthetic.encode_fn(None, negative)
    with aesthetic:
        return fn(model, [prompt]), fn(model, [negative])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_weight_zero_is_bit_identical_and_cache_hit_runs_no_optimisation(tiny_model, hf_clip, family):
    model = tiny_model(family)
    tower = standalone_tower(model, hf_clip)
    embedding = _embedding(tower.dim)
    plain_c, plain_u = _encode(model, None, "a castle on a hill", "blurry")
    personaliser = Personaliser()
    off = StandaloneAesthetic(model, embedding, AestheticOptions(embedding="style", weight=0.0), tower=tower,
                              personaliser=personaliser)
    c, u = _encode(model, off, "a castle on a hill", "blurry")
    assert torch.equal(c, plain_c) and torch.equal(u, plain_u) and personaliser.optimisations == 0

    on = StandaloneAesthetic(model, embedding, AestheticOptions(embedding="style", steps=3, lr=1e-3), tower=tower,
                             personaliser=personaliser)
    c1, u1 = _encode(model, on, "a castle on a hill", "blurry")
    assert personaliser.optimisations == 1          # the negative prompt is left alone by default
    assert not torch.allclose(c1, plain_c) and torch.equal(u1, plain_u)
    c2, _ = _encode(model, on, "a castle on a hill", "blurry")
    assert personaliser.optimisations == 1 and torch.equal(c1, c2)   # cache hit: nothing optimised
    # the patch is gone after the block: plain encoding again, bit for bit
    assert torch.equal(encode_prompts(model, ["a castle on a hill"]), plain_c)

    # weight is applied after the cache: another weight reuses the tuned conditioning
    half = StandaloneAesthetic(model, embedding, AestheticOptions(embedding="style", steps=3, lr=1e-3, weight=0.5),
                               tower=tower, personaliser=personaliser)
    c3, _ = _encode(model, half, "a castle on a hill", "blurry")
    assert personaliser.optimisations == 1
    zn = (c1 - 0.1 * plain_c) / 0.9
    torch.testing.assert_close(c3, 0.5 * plain_c + 0.5 * zn, rtol=1e-4, atol=1e-5)

    both = StandaloneAesthetic(model, embedding, AestheticOptions(embedding="style", steps=3, lr=1e-3,
                                                                   leave_negative=False),
                               tower=tower, personaliser=personaliser)
    _, u4 = _encode(model, both, "a castle on a hill", "blurry")
    assert personaliser.optimisations == 2 and not torch.allclose(u4, plain_u)


def test_textual_inversion_vectors_reach_the_personalised_tower(tiny_model, hf_clip, tmp_path):
    from extensions_lib.embeddings.loader import EmbeddingLoader
    model = tiny_model("sd1")
    tower = standalone_tower(model, hf_clip)
    folder = tmp_path / "emb"
    folder.mkdir()
    from extensions_lib.formats.embedding import Embedding
    from extensions_lib.formats.embedding_pt import save_embedding_pt

    save_embedding_pt(Embedding(name="zork", vectors=torch.randn(2, 32) * 3), folder / "zork.pt")
    personaliser = Personaliser()
    on = StandaloneAesthetic(model, _embedding(tower.dim), AestheticOptions(embedding="style", steps=2, lr=1e-3),
                             tower=tower, personaliser=personaliser)
    with EmbeddingLoader(model, folder) as embeddings:
        with_ti, _ = _encode_with(model, on, embeddings.encode, "zork castle")
    with EmbeddingLoader(model, folder) as embeddings:
        save_embedding_pt(Embedding(name="zork", vectors=torch.randn(2, 32) * 3), folder / "zork.pt")
        other_ti, _ = _encode_with(model, on, embeddings.encode, "zork castle")
    assert personaliser.optimisations == 2      # other vectors, other cache entry
    assert not torch.allclose(with_ti, other_ti)


def _encode_with(model, aesthetic, base, prompt):
    fn = aesthetic.encode_fn(base, "")
    with aesthetic:
        return fn(model, [prompt]), None


def test_wrong_family_embedding_is_refused(tiny_model, hf_clip):
    model = tiny_model("sd2")
    with pytest.raises(AlchemyError, match="1024 for SD2|SD2"):
        StandaloneAesthetic(model, _embedding(16), AestheticOptions(embedding="style"), clip_path=hf_clip)


def test_slerp_keeps_ends_and_unit_length():
    a, b = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    torch.testing.assert_close(slerp(a, b, 0.3).norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(slerp(a, a, 0.5), a)      # parallel: no division by zero
