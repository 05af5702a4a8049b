"""``extensions_lib.prompt`` against the host's own rules, restated independently in host_prompt_reference:
emphasis parsing, 75-token chunking with BREAK, comma backtrack and embeddings, batch padding, emphasis."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from extensions_lib.prompt import (BREAK, SpecialTokens, apply_emphasis, chunk_prompt, even_out_chunks,
                                   parse_prompt_attention)
from host_prompt_reference import HostPromptWrapper, host_emphasis, host_parse_prompt_attention

S, E, COMMA = 49406, 49407, 267

PROMPTS = [
    "", "plain words", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "[[[a]]] (b:-0.5) (c : 2 ) ]stray) :colon",
    "a BREAK b", "BREAK", "x BREAK BREAK y", "(in BREAK brackets)", "back\\\\slash \\ alone", "((a) [b:1.2] c)",
    "weird (a:1e3) (b:.5) (c:+1.) d",
]


def _same_segments(ours, host):
    assert len(ours) == len(host)
    for mine, theirs in zip(ours, host):
        if mine is BREAK:
            assert theirs == ["BREAK", -1]
        else:
            assert mine[0] == theirs[0] and mine[1] == pytest.approx(theirs[1], rel=1e-12)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_emphasis_parsing_matches_the_host(prompt):
    _same_segments(parse_prompt_attention(prompt), host_parse_prompt_attention(prompt))


def test_emphasis_parsing_matches_the_host_on_random_prompts():
    rng = random.Random(5)
    pieces = ["a", " b ", "(", ")", "[", "]", ":1.5)", ":0.25)", ":", "\\(", "\\]", "\\\\", "\\", " BREAK ", ",", "c:d"]
    for _ in range(500):
        prompt = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        _same_segments(parse_prompt_attention(prompt), host_parse_prompt_attention(prompt))


# ---- chunking ------------------------------------------------------------------------------------------------

class _Embedding:
    def __init__(self, name, vectors):
        self.name, self.vectors, self.shorthash = name, vectors, "abc"


class _Db:
    """The host's embedding database lookup: token sequences (7, 8) and (9,) name embeddings."""

    def __init__(self, vectors):
        self.names = {(7, 8): _Embedding("pair", vectors), (9,): _Embedding("nine", 1)}

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in sorted(self.names.items(), key=lambda kv: -len(kv[0])):
            if tuple(tokens[offset:offset + len(ids)]) == ids:
                return embedding, len(ids)
        return None, None


class _Matcher:
    """Our matcher interface over the same lookup."""

    def __init__(self, db):
        self.db = db

    def find_at(self, tokens, pos):
        embedding, length = self.db.find_embedding_at_position(tokens, pos)
        return None if embedding is None else (length, embedding.vectors, embedding)


class _HostNumbers(HostPromptWrapper):
    """The host's wrapper over a tokenizer where the word "12" is token 12 and "," the comma token (so chunk
    layouts read plainly)."""

    def __init__(self, pad, db, emphasis, backtrack):
        self.id_start, self.id_end, self.id_pad, self.comma_token = S, E, pad, COMMA
        self.hijack = SimpleNamespace(embedding_db=db, fixes=None, extra_generation_params={})
        self.opts = SimpleNamespace(emphasis=emphasis, comma_padding_backtrack=backtrack,
                                    textual_inversion_add_hashes_to_infotext=True)

    def host_opts(self):
        return self.opts

    def tokenize(self, texts):
        return [[COMMA if w == "," else int(w) if w.isdigit() else 1000 + sum(map(ord, w))  # other words: ids >1000
                 for w in text.replace(",", " , ").split()] for text in texts]


def _numbers(rng: random.Random, n: int) -> str:
    words = []
    for _ in range(n):
        r = rng.random()
        words.append("," if r < 0.12 else "7 8" if r < 0.16 else "9" if r < 0.18 else str(rng.randint(10, 99)))
    text = " ".join(words)
    if rng.random() < 0.5:  # emphasis around a stretch, and sometimes a BREAK
        cut = rng.randint(0, len(text))
        text = f"{text[:cut]} ({text[cut:]}:{rng.choice(['1.3', '0.7'])})"
    if rng.random() < 0.3:
        cut = text.rfind(" ", 0, max(1, len(text) // 2))
        text = f"{text[:max(cut, 0)]} BREAK {text[max(cut, 0):]}"
    return text


@pytest.mark.parametrize("pad", [E, 0], ids=["sd1", "sd2"])
@pytest.mark.parametrize("emphasis", ["Original", "None"])
@pytest.mark.parametrize("backtrack", [20, 0, 3])
@pytest.mark.parametrize("vectors", [1, 4, 74])
def test_chunks_match_the_host(pad, emphasis, backtrack, vectors):
    """Tokens as they reach the encoder (after the host's SD2 pad rewrite), multipliers and embedding fixes of
    every chunk of a batch of prompts (short, exactly 75 tokens, long, with BREAK, commas near the 75-token
    edge, embeddings that do not fit the chunk), padded to one chunk count."""
    db = _Db(vectors)
    host = _HostNumbers(pad, db, emphasis, backtrack)
    host.carry_fixes_on_backtrack = True  # the one host bug we do not copy (see the test below)
    ids = SpecialTokens(S, E, pad, COMMA)
    rng = random.Random(hash((pad, emphasis, backtrack, vectors)) & 0xFFFF)
    edge = " ".join(["11"] * 70) + " , 12 13 14 15 16 17 18"  # the comma falls 5 tokens before the edge
    batches = [["12 13", " ".join(["10"] * 75)], [edge, "7 8 " + " ".join(["10"] * 73) + " 7 8"]]
    batches += [[_numbers(rng, rng.randint(0, 200)) for _ in range(3)] for _ in range(12)]
    for prompts in batches:
        host_batch, _count = host.process_texts(prompts)
        ours = even_out_chunks([chunk_prompt(host, p, ids, _Matcher(db), emphasis, backtrack) for p in prompts], ids)
        width = max(len(chunks) for chunks in host_batch)
        assert all(len(chunks) == width for chunks in ours), prompts
        for i in range(width):
            row = [chunks[i] if i < len(chunks) else host.empty_chunk() for chunks in host_batch]
            sent = host.encoder_tokens([c.tokens for c in row])
            assert torch.equal(torch.asarray([c.tokens for c in (o[i] for o in ours)]), sent), prompts
            assert [o[i].multipliers for o in ours] == [c.multipliers for c in row], prompts
            assert [[(off, emb.name) for off, emb in o[i].fixes] for o in ours] == \
                [[(off, emb.name) for off, emb in c.fixes] for c in row]


def test_the_host_reference_chunks_as_the_host_documents():
    """Anchors for the reference itself (a1111-host.md 3.2-3.3): 75 tokens + start/end per chunk; an embedding
    that does not fit starts a new chunk; a comma within the backtrack distance moves the tail."""
    host = _HostNumbers(E, _Db(4), "Original", 20)
    (chunk,), count = host.tokenize_line("12 13")
    assert chunk.tokens == [S, 12, 13] + [E] * 74 and count == 2
    chunks, _ = host.tokenize_line(" ".join(["10"] * 73) + " 7 8")
    assert [len(c.tokens) for c in chunks] == [77, 77] and chunks[1].fixes[0][0] == 0
    assert chunks[1].tokens[1:5] == [0, 0, 0, 0] and chunks[0].tokens[74:] == [E, E, E]
    chunks, _ = host.tokenize_line(" ".join(["11"] * 70) + " , 12 13 14 15 16 17 18")
    assert chunks[0].tokens[1:72] == [11] * 70 + [COMMA] and chunks[0].tokens[72:] == [E] * 5
    assert chunks[1].tokens[1:8] == [12, 13, 14, 15, 16, 17, 18]


def test_an_embedding_moved_by_the_comma_backtrack_keeps_its_vectors():
    """The host leaves the fix of an embedding in the tail it moves to the next chunk behind: its vectors go
    to padding rows of the first chunk and the moved placeholders stay token 0. We move the fix along."""
    prompt = " ".join(["11"] * 70) + " , 12 7 8 13 14 15"  # "7 8" (2 vectors) sits in the moved tail
    db, ids = _Db(2), SpecialTokens(S, E, E, COMMA)
    host = _HostNumbers(E, db, "Original", 20)
    host_chunks, _ = host.tokenize_line(prompt)
    assert [off for off, _ in host_chunks[0].fixes] == [72] and host_chunks[1].fixes == []
    ours = chunk_prompt(host, prompt, ids, _Matcher(db))
    assert ours[0].fixes == [] and [off for off, _ in ours[1].fixes] == [1]
    assert ours[1].tokens[1:6] == host_chunks[1].tokens[1:6] == [12, 0, 0, 13, 14]


# ---- emphasis ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["Original", "No norm", "Ignore", "None"])
def test_emphasis_matches_the_host(mode):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 16, generator=g) + 0.3  # a mean well away from 0, where the host's rescale is defined
    multipliers = torch.ones(2, 77)
    multipliers[0, 3:9] = 1.3
    multipliers[1, 40:] = 1 / 1.1
    torch.testing.assert_close(apply_emphasis(z, multipliers, mode), host_emphasis(z, multipliers, mode),
                               rtol=1e-6, atol=1e-6)
    plain = torch.ones(2, 77)
    torch.testing.assert_close(apply_emphasis(z, plain, mode), host_emphasis(z, plain, mode), rtol=1e-6, atol=1e-6)
