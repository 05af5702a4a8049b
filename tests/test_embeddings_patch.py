"""The reversible token-embedding patch: splicing as the WebUI does, exactness, undo, gradients."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from extensions_lib.adapter import TextEncoderInfo
from extensions_lib.backend.text_encoding import encode_chunks
from extensions_lib.embeddings.matcher import EmbeddingMatcher
from extensions_lib.embeddings.patch import EmbeddingsWithFixes, patch_text_encoders, splice_row
from extensions_lib.formats.embedding import Embedding
from extensions_lib.prompt import SpecialTokens, close_chunk, encode_prompts, fixes_active

NAME = "zqxstyle"
SPARE_IDS = [40000, 40001, 40002]  # ordinary vocabulary rows the reference model overwrites


def embedding(width: int, count: int = 3, seed: int = 0) -> Embedding:
    return Embedding(NAME, torch.randn(count, width, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_spliced_vectors_encode_exactly_like_the_same_vectors_stored_as_vocabulary_rows(tiny_model, family):
    adapter = tiny_model(family)
    emb = embedding(adapter.text_encoders[0].width)
    matcher = EmbeddingMatcher(adapter.tokenizer, [emb])
    with torch.no_grad(), patch_text_encoders(adapter):
        got = encode_prompts(adapter, [f"a photo of {NAME}, red"], matcher=matcher)

    # Independent path: a copy of the text encoder whose vocabulary rows SPARE_IDS hold the vectors,
    # fed token ids directly (no matcher, no patch, no emphasis).
    reference = copy.deepcopy(adapter.text_encoder)
    with torch.no_grad():
        reference.text_model.embeddings.token_embedding.weight[SPARE_IDS] = emb.vectors
        tok = adapter.tokenizer.tokenize
        body = tok(["a photo of"])[0] + SPARE_IDS + tok([", red"])[0]
        chunk = close_chunk(body, [1.0] * len(body), [], SpecialTokens.of(adapter.text_encoders[0]))
        expected = encode_chunks(reference, torch.tensor([chunk.tokens]), adapter.family)
    assert torch.equal(got, expected)


def test_patch_changes_nothing_without_embeddings_and_unpatch_restores_the_module(tiny_model):
    adapter = tiny_model("sd1")
    holder = adapter.text_encoder.text_model.embeddings
    original = holder.token_embedding
    prompts = [f"a photo of {NAME}", "(red:1.2) cat BREAK dog"]
    emb = embedding(adapter.text_encoders[0].width)
    matcher = EmbeddingMatcher(adapter.tokenizer, [emb])
    with torch.no_grad():
        before = encode_prompts(adapter, prompts)
        before_with_matcher = encode_prompts(adapter, prompts, matcher=matcher)  # placeholders, not spliced
        patch = patch_text_encoders(adapter)
        try:
            assert isinstance(holder.token_embedding, EmbeddingsWithFixes)
            assert holder.token_embedding.weight is original.weight
            assert torch.equal(encode_prompts(adapter, prompts), before)
            spliced = encode_prompts(adapter, prompts, matcher=matcher)
            assert not torch.equal(spliced, before_with_matcher)
            # (Emphasis renormalises over the batch, so compare the prompt without an embedding alone.)
            assert torch.equal(encode_prompts(adapter, prompts[1:], matcher=matcher),
                               encode_prompts(adapter, prompts[1:]))
        finally:
            patch.unpatch()
        assert holder.token_embedding is original
        assert torch.equal(encode_prompts(adapter, prompts), before)
        assert torch.equal(encode_prompts(adapter, prompts, matcher=matcher), before_with_matcher)


def test_gradient_reaches_the_vectors_and_nothing_in_the_model(tiny_model):
    adapter = tiny_model("sd1")
    vectors = torch.randn(2, adapter.text_encoders[0].width, requires_grad=True)
    emb = Embedding(NAME, vectors)
    with patch_text_encoders(adapter):
        cond = encode_prompts(adapter, [f"a {NAME} cat"], matcher=EmbeddingMatcher(adapter.tokenizer, [emb]))
        cond.pow(2).mean().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in adapter.text_encoder.parameters())


def test_patching_twice_is_refused_and_leaves_one_patch(tiny_model):
    adapter = tiny_model("sd1")
    holder = adapter.text_encoder.text_model.embeddings
    original = holder.token_embedding
    with patch_text_encoders(adapter):
        wrapper = holder.token_embedding
        with pytest.raises(RuntimeError, match="already has an embedding patch"):
            patch_text_encoders(adapter)
        assert holder.token_embedding is wrapper and wrapper.wrapped is original
    assert holder.token_embedding is original


def test_splice_row_writes_after_the_offset_and_cuts_at_the_chunk_end():
    row = torch.arange(77 * 4, dtype=torch.float32).reshape(77, 4)
    vectors = torch.full((5, 4), -1.0, dtype=torch.float64)
    fix = SimpleNamespace(vectors=vectors)
    out = splice_row(row, [(2, fix), (74, fix)])
    assert out.dtype == torch.float32 and out.shape == row.shape
    expected = row.clone()
    expected[3:8] = -1.0     # offset 2 -> rows 3..7 (the +1 skips the start token)
    expected[75:77] = -1.0   # offset 74: only two rows are left
    assert torch.equal(out, expected)


class TwoEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.l_embed = nn.Embedding(100, 3)
        self.g_embed = nn.Embedding(100, 5)


def test_each_encoder_of_an_sdxl_model_gets_its_own_vectors():
    model = TwoEncoders()
    adapter = SimpleNamespace(modules=lambda: {"text_encoder": model}, text_encoders=[
        TextEncoderInfo("clip_l", 3, model.l_embed), TextEncoderInfo("clip_g", 5, model.g_embed)])
    sdxl = Embedding("x", {"clip_l": torch.ones(2, 3), "clip_g": torch.full((2, 5), 2.0)})
    ids = torch.zeros(1, 77, dtype=torch.long)
    with patch_text_encoders(adapter), torch.no_grad(), fixes_active([[(0, sdxl)]]):
        l_out, g_out = model.l_embed(ids), model.g_embed(ids)
    assert torch.equal(l_out[0, 1:3], torch.ones(2, 3)) and torch.equal(g_out[0, 1:3], torch.full((2, 5), 2.0))
    assert torch.equal(l_out[0, 3:], model.l_embed.weight[0].expand(74, 3))
    assert isinstance(model.l_embed, nn.Embedding) and isinstance(model.g_embed, nn.Embedding)


def test_fixes_for_another_batch_size_are_an_error_not_a_silent_misplacement():
    wrapper = EmbeddingsWithFixes(nn.Embedding(10, 2))
    fix = SimpleNamespace(vectors=torch.zeros(1, 2))
    with fixes_active([[(0, fix)], []]), pytest.raises(RuntimeError, match="2 rows of embedding fixes"):
        wrapper(torch.zeros(3, 77, dtype=torch.long))
