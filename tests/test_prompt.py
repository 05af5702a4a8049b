"""Prompt parsing, chunking and encoding follow the WebUI's rules; embedding fixes reach the encoder."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from extensions_lib.adapter import TextEncoderInfo
from extensions_lib.backend.text_encoding import encode_chunks
from extensions_lib.errors import AlchemyError
from extensions_lib.prompt import (BREAK, PromptChunk, SpecialTokens, active_fixes, apply_emphasis, chunk_prompt,
                                   empty_chunk, encode_prompts, parse_prompt_attention)

S, E = 49406, 49407
SD1 = SpecialTokens(start=S, end=E, pad=E, comma=267)
SD2 = SpecialTokens(start=S, end=E, pad=0, comma=267)


class NumberTokenizer:
    """Test double: the word "12" is token 12 and "," is the comma token, so chunk layouts read plainly."""

    id_start, id_end, id_pad, comma_token = S, E, E, 267

    def tokenize(self, texts):
        return [[267 if w == "," else int(w) for w in text.replace(",", " , ").split()] for text in texts]


class PairMatcher:
    """Test double for the TI loader: the token pair (7, 8) names an embedding with `vectors` vectors."""

    def __init__(self, vectors: int = 3, payload="emb"):
        self.vectors, self.payload = vectors, payload

    def find_at(self, tokens, pos):
        return (2, self.vectors, self.payload) if list(tokens[pos:pos + 2]) == [7, 8] else None


def words(first: int, last: int) -> str:
    return " ".join(str(i) for i in range(first, last + 1))


def chunks_of(prompt: str, ids=SD1, **kw) -> list[PromptChunk]:
    return chunk_prompt(NumberTokenizer(), prompt, ids, **kw)


def body(chunk: PromptChunk) -> list[int]:
    """The prompt tokens of a chunk: between the start token and the first end token."""
    return chunk.tokens[1:chunk.tokens.index(E, 1)]


# --- parsing: the examples documented in the WebUI's prompt_parser ---------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_documented_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("", [("", 1.0)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("[unclosed", [("unclosed", 1 / 1.1)]),
    ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("( a : 1.3 )", [(" a ", 1.3)]),  # spaces around the weight are allowed
    ("(a:-1)", [("a", -1.0)]),
    ("[a:1.3]", [("a:1.3", 1 / 1.1)]),  # weights only work in round brackets
    ("a:1.3) b)", [("a:1.3) b)", 1.0)]),  # stray closers are text
    ("\\\\ and \\x", [("\\ and x", 1.0)]),  # escaped backslash kept, lone backslash dropped
    ("((a) b)", [("a", 1.1 * 1.1), (" b", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text (the WebUI raises instead)
])
def test_syntax_details(text, expected):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_break_keyword():
    parsed = parse_prompt_attention("a cat BREAK, (dog) BREAKfast BREAK")
    assert parsed == [("a cat", 1.0), BREAK, (", ", 1.0), ("dog", 1.1), (" BREAKfast", 1.0), BREAK, ("", 1.0)]
    assert parsed[1] is BREAK
    # As in the host, brackets scale a BREAK too: it is then the text "BREAK" at weight -1.1, not a break.
    parsed = parse_prompt_attention("(a BREAK b)")
    assert parsed[0] == ("a", 1.1) and parsed[1] == ("BREAK", -1.1) and parsed[1] is not BREAK


# --- chunking -------------------------------------------------------------------------------------

def test_short_prompt_is_padded_like_the_webui():
    (sd1,) = chunks_of("1 2 3")
    assert sd1.tokens == [S, 1, 2, 3] + [E] * 73 and sd1.multipliers == [1.0] * 77 and sd1.fixes == []
    (sd2,) = chunks_of("1 2 3", ids=SD2)
    assert sd2.tokens == [S, 1, 2, 3, E] + [0] * 72
    assert empty_chunk(SD1).tokens == [S] + [E] * 76 and empty_chunk(SD2).tokens == [S, E] + [0] * 75
    assert chunks_of("") == [empty_chunk(SD1)]


def test_chunks_hold_75_tokens():
    assert [body(c) for c in chunks_of(words(1, 75))] == [list(range(1, 76))]
    two = chunks_of(words(1, 76))
    assert [body(c) for c in two] == [list(range(1, 76)), [76]]
    assert all(len(c.tokens) == len(c.multipliers) == 77 for c in two)
    assert two[0].tokens[-1] == E  # a full chunk still ends with the end token


def test_comma_backtrack_moves_the_tail_after_the_last_comma():
    prompt = f"{words(1, 70)} , {words(71, 80)}"
    first, second = chunks_of(prompt)
    assert body(first) == list(range(1, 71)) + [267]
    assert body(second) == list(range(71, 81))
    # Disabled, or the comma too far back (> 20 tokens): plain 75-token split.
    for p, kw in [(prompt, {"comma_backtrack": 0}), (f"{words(1, 50)} , {words(51, 80)}", {})]:
        first, second = chunks_of(p, **kw)
        assert len(body(first)) == 75 and len(body(second)) == 6


def test_break_starts_a_new_chunk():
    assert [body(c) for c in chunks_of("1 2 BREAK 3")] == [[1, 2], [3]]
    assert [body(c) for c in chunks_of("BREAK")] == [[]]
    assert [body(c) for c in chunks_of("BREAK 1")] == [[], [1]]
    assert [body(c) for c in chunks_of("1 BREAK")] == [[1]]
    # A chunk that is exactly full is only closed by what follows, so this BREAK adds no empty chunk.
    assert [body(c) for c in chunks_of(f"{words(1, 75)} BREAK 1")] == [list(range(1, 76)), [1]]


def test_multipliers_follow_emphasis():
    (chunk,) = chunks_of("1 (2) [3] (4 5:1.5)")
    assert chunk.multipliers[:7] == pytest.approx([1.0, 1.0, 1.1, 1 / 1.1, 1.5, 1.5, 1.0])
    assert chunk.multipliers[7:] == [1.0] * 70


def test_emphasis_none_keeps_brackets_as_text(tmp_path):
    from extensions_lib.backend.tokenizer import make_tokenizer

    tok = make_tokenizer("clip", cache_dir=tmp_path)
    (plain,) = chunk_prompt(tok, "(cat:1.2) BREAK dog", SD1, emphasis="None")
    assert body(plain) == tok.tokenize(["(cat:1.2) BREAK dog"])[0] and set(plain.multipliers) == {1.0}
    parsed = chunk_prompt(tok, "(cat:1.2) BREAK dog", SD1)
    assert [body(c) for c in parsed] == tok.tokenize(["cat", "dog"])
    assert parsed[0].multipliers[:3] == [1.0, 1.2, 1.0]


def test_embedding_placeholders_and_fixes():
    (chunk,) = chunks_of("1 (7 8:1.5) 2", matcher=PairMatcher(vectors=3))
    assert body(chunk) == [1, 0, 0, 0, 2]
    assert chunk.fixes == [(1, "emb")]
    assert chunk.multipliers[1:6] == [1.0, 1.5, 1.5, 1.5, 1.0]


def test_embedding_that_does_not_fit_starts_a_new_chunk():
    first, second = chunks_of(f"{words(10, 82)} 7 8 2", matcher=PairMatcher(vectors=3))
    assert body(first) == list(range(10, 83)) and first.fixes == []
    assert body(second) == [0, 0, 0, 2] and second.fixes == [(0, "emb")]


def test_comma_backtrack_carries_embedding_fixes():
    # 70 words, a comma, an embedding (3 vectors) and a word fill 75; the next word triggers the backtrack.
    first, second = chunks_of(f"{words(10, 79)} , 7 8 1 2", matcher=PairMatcher(vectors=3))
    assert body(first) == list(range(10, 80)) + [267] and first.fixes == []
    assert body(second) == [0, 0, 0, 1, 2] and second.fixes == [(0, "emb")]


def test_oversized_embedding_is_a_clear_error():
    with pytest.raises(AlchemyError, match="76 vectors"):
        chunks_of("7 8", matcher=PairMatcher(vectors=76, payload="huge"))


# --- encoding -------------------------------------------------------------------------------------

def tiny_text_model(seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77)
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    # Fresh layer norms have zero bias, which makes z.mean() ~ 0 and the "Original" rescale degenerate;
    # trained CLIP encoders have a clearly non-zero mean.
    with torch.no_grad():
        model.text_model.final_layer_norm.bias.normal_(0.5, 0.2)
    return model


class TinyAdapter:
    """The text half of a ModelAdapter over a tiny CLIPTextModel; records what each encode call saw."""

    def __init__(self, family: str = "sd1"):
        self.family = family
        self.text_model = tiny_text_model()
        self.tokenizer = NumberTokenizer()
        emb = self.text_model.text_model.embeddings.token_embedding
        pad = E if family == "sd1" else 0
        self.text_encoders = [TextEncoderInfo(key="", width=16, token_embedding=emb, id_pad=pad)]
        self.calls: list[tuple[torch.Tensor, object]] = []

    def encode_token_chunks(self, tokens, clip_skip=1):
        self.calls.append((tokens, copy.deepcopy(active_fixes())))
        return encode_chunks(self.text_model, tokens, self.family, clip_skip)


@pytest.fixture(scope="module")
def adapter():
    return TinyAdapter()


def encode_rows(adapter, rows, clip_skip=1):
    with torch.no_grad():
        return encode_chunks(adapter.text_model, torch.tensor(rows), adapter.family, clip_skip)


def test_batch_chunk_counts_are_evened_out(adapter):
    with torch.no_grad():
        cond = encode_prompts(adapter, ["1 2", words(1, 80)], clip_skip=2)
    assert cond.shape == (2, 154, 16)
    short, long_first, long_second = chunks_of("1 2")[0], *chunks_of(words(1, 80))
    expected = encode_rows(adapter, [short.tokens, long_first.tokens, empty_chunk(SD1).tokens, long_second.tokens], 2)
    torch.testing.assert_close(cond[0], torch.cat([expected[0], expected[2]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[1], torch.cat([expected[1], expected[3]]), rtol=0, atol=1e-6)


def test_original_emphasis_scales_tokens_and_restores_the_batch_mean(adapter):
    prompts = ["1 (2:1.5) 3", "[4] 5"]
    chunks = [chunks_of(p)[0] for p in prompts]
    z = encode_rows(adapter, [c.tokens for c in chunks])
    m = torch.tensor([c.multipliers for c in chunks]).unsqueeze(-1)
    scaled = z * m
    expected = {"Original": scaled * (z.mean() / scaled.mean()), "No norm": scaled, "Ignore": z}
    for mode, want in expected.items():
        with torch.no_grad():
            got = encode_prompts(adapter, prompts, emphasis=mode)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(expected["Original"], z, atol=1e-4)


def test_apply_emphasis_keeps_dtype():
    z = torch.randn(2, 77, 8, dtype=torch.float16)
    assert apply_emphasis(z, torch.full((2, 77), 1.2)).dtype == torch.float16


def test_unknown_emphasis_names_the_choices(adapter):
    with pytest.raises(AlchemyError, match="No norm"):
        encode_prompts(adapter, ["1"], emphasis="Loud")


def test_sd2_chunks_reach_the_encoder_padded_with_zero():
    sd2 = TinyAdapter("sd2")
    with torch.no_grad():
        encode_prompts(sd2, ["1 2"])
    (tokens, _), = sd2.calls
    assert tokens.tolist() == [[S, 1, 2, E] + [0] * 73]


def test_active_fixes_are_set_per_chunk_batch_only(adapter):
    adapter.calls.clear()
    with torch.no_grad():
        encode_prompts(adapter, [f"{words(10, 82)} 7 8", "7 8 1"], matcher=PairMatcher(vectors=3))
    assert [fixes for _, fixes in adapter.calls] == [[[], [(0, "emb")]], [[(0, "emb")], []]]
    assert active_fixes() is None

    class Failing(TinyAdapter):
        def encode_token_chunks(self, tokens, clip_skip=1):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        encode_prompts(Failing(), ["7 8"], matcher=PairMatcher())
    assert active_fixes() is None


class SpliceFixes(torch.nn.Module):
    """What the TI loader will install: put each fix's vectors after its offset (+1 for the start token)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        out = self.inner(ids)
        rows = []
        for row, fixes in zip(out, active_fixes() or [[]] * len(out)):
            for offset, vectors in fixes:
                row = torch.cat([row[:offset + 1], vectors, row[offset + 1 + len(vectors):]])
            rows.append(row)
        return torch.stack(rows)


def test_fixes_splice_embeddings_end_to_end_and_train():
    adapter = TinyAdapter()
    vectors = torch.randn(2, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    embeddings = adapter.text_model.text_model.embeddings
    original = embeddings.token_embedding
    prompt = "1 (7 8) 2"
    with torch.no_grad():
        before = encode_prompts(adapter, [prompt], matcher=PairMatcher(2, vectors))

    # Independent expectation: the same vectors stored as two real vocabulary entries.
    reference = copy.deepcopy(adapter)
    with torch.no_grad():
        reference.text_model.text_model.embeddings.token_embedding.weight[[40000, 40001]] = vectors
        expected = encode_prompts(reference, ["1 (40000 40001) 2"])

    embeddings.token_embedding = SpliceFixes(original)
    try:
        spliced = encode_prompts(adapter, [prompt], matcher=PairMatcher(2, vectors))
        torch.testing.assert_close(spliced, expected, rtol=1e-6, atol=1e-6)
        spliced.pow(2).mean().backward()
        assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    finally:
        embeddings.token_embedding = original
    with torch.no_grad():
        assert torch.equal(encode_prompts(adapter, [prompt], matcher=PairMatcher(2, vectors)), before)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_encodes_through_the_standalone_model(tiny_model, family):
    model = tiny_model(family)
    ids = SpecialTokens.of(model.text_encoders[0])
    assert ids == SpecialTokens.of(model.tokenizer)  # the adapter and its tokenizer agree on padding
    prompts = ["a (cat:1.2), BREAK dog", "a photo of a cat"]
    with torch.no_grad():
        cond = encode_prompts(model, prompts, clip_skip=1)
        chunks = [chunk_prompt(model.tokenizer, p, ids) for p in prompts]
        first = torch.tensor([c[0].tokens for c in chunks])
        z = encode_chunks(model.text_encoder, first, family)
    assert cond.shape == (2, 154, model.text_encoders[0].width)
    m = torch.tensor([c[0].multipliers for c in chunks]).unsqueeze(-1)
    torch.testing.assert_close(cond[:, :77], z * m * (z.mean() / (z * m).mean()), rtol=1e-5, atol=1e-5)
