"""Token-level matching of embedding names (the WebUI's ids_lookup rules) and how matches chunk."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from extensions_lib.embeddings.matcher import EmbeddingMatcher, build_ids_lookup, find_in_lookup
from extensions_lib.prompt import CHUNK_LENGTH, SpecialTokens, chunk_prompt


@dataclass
class Emb:
    name: str
    num_vectors: int = 1


@pytest.fixture(scope="module")
def tokenizer():
    from extensions_lib.backend.tokenizer import make_tokenizer

    return make_tokenizer("clip")


def test_lookup_tries_longest_name_first_and_falls_back_to_shorter():
    lookup = build_ids_lookup([((5,), "short"), ((5, 6, 7), "long"), ((5, 6), "mid"), ((9,), "other"), ((), "empty")])
    assert [ids for ids, _ in lookup[5]] == [(5, 6, 7), (5, 6), (5,)]
    assert find_in_lookup(lookup, [1, 5, 6, 7, 2], 1) == (3, "long")
    assert find_in_lookup(lookup, [1, 5, 6, 8], 1) == (2, "mid")
    assert find_in_lookup(lookup, [5, 8], 0) == (1, "short")
    assert find_in_lookup(lookup, [5, 6, 7], 2) is None           # 7 starts no name
    assert find_in_lookup(lookup, [1, 2], 0) is None
    assert all(ids for candidates in lookup.values() for ids, _ in candidates)  # the empty name is unmatchable


def test_names_match_as_the_tokenizer_splits_them(tokenizer):
    style, style_xl, cat = Emb("my-style", 3), Emb("my-style-xl", 2), Emb("Cat", 4)
    matcher = EmbeddingMatcher(tokenizer, [style, style_xl, cat])
    tokens = tokenizer.tokenize(["a cat in my-style-xl and my-style, mystyle"])[0]
    used = matcher.find_all(tokens)
    # "Cat" matches "cat" (the tokenizer lower-cases), the longer name wins where both fit, "mystyle" is
    # one different token and matches nothing.
    assert [e.name for e in used] == ["Cat", "my-style-xl", "my-style"]
    pos = tokens.index(tokenizer.tokenize(["cat"])[0][0])
    assert matcher.find_at(tokens, pos) == (1, 4, cat)


def test_later_embedding_of_the_same_name_wins(tokenizer):
    first, second = Emb("thing", 1), Emb("thing", 5)
    matcher = EmbeddingMatcher(tokenizer, [first, second])
    tokens = tokenizer.tokenize(["thing"])[0]
    assert matcher.find_at(tokens, 0)[2] is second


def test_name_without_tokens_is_reported_unmatchable(tokenizer):
    matcher = EmbeddingMatcher(tokenizer, [Emb("   "), Emb("ok")])
    assert matcher.unmatchable == ["   "]


def test_embedding_that_does_not_fit_starts_a_new_chunk_with_its_vectors(tokenizer):
    emb = Emb("zqxstyle", 4)
    matcher = EmbeddingMatcher(tokenizer, [emb])
    name_ids = tokenizer.tokenize(["zqxstyle"])[0]
    words = " ".join(["photo"] * (CHUNK_LENGTH - 2))  # 73 tokens: 4 placeholders no longer fit
    first, second = chunk_prompt(tokenizer, f"{words} zqxstyle red", SpecialTokens.of(tokenizer), matcher)
    assert first.fixes == [] and first.tokens[1:CHUNK_LENGTH - 1] == tokenizer.tokenize([words])[0]
    assert second.fixes == [(0, emb)]
    red = tokenizer.tokenize(["red"])[0]
    assert second.tokens[1:1 + 4 + len(red)] == [0, 0, 0, 0] + red
    assert not set(name_ids) & set(second.tokens[1:6])
