"""Finding embedding names in a prompt's token stream, as the WebUI's ``EmbeddingDatabase`` does.

Names are matched at token level, not as text: each name is tokenized with the model's tokenizer and
filed under its first token id (``ids_lookup``); at each prompt position the candidates filed under
that token are tried longest first. Because the tokenizer lower-cases and splits on punctuation, the
name ``MyStyle`` matches ``mystyle`` in a prompt, and a name only matches where the prompt tokenizes
the same way (``mystyle,`` does; ``mystyles`` does not).

:class:`EmbeddingMatcher` is the ``matcher`` that :func:`extensions_lib.prompt.encode_prompts` takes; its
payloads are the embeddings themselves (anything with ``name``, ``num_vectors`` and ``vectors``).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

IdsLookup = dict[int, list[tuple[tuple[int, ...], Any]]]


def build_ids_lookup(named_ids: Iterable[tuple[Sequence[int], Any]]) -> IdsLookup:
    """``{first token id: [(name ids, payload), ...]}`` with each list sorted longest name first.

    Names with no tokens are left out (nothing could ever match them). For equal lengths the order of
    `named_ids` is kept.
    """
    lookup: IdsLookup = {}
    for ids, payload in named_ids:
        ids = tuple(int(i) for i in ids)
        if ids:
            lookup.setdefault(ids[0], []).append((ids, payload))
    for candidates in lookup.values():
        candidates.sort(key=lambda item: len(item[0]), reverse=True)
    return lookup


def find_in_lookup(lookup: IdsLookup, tokens: Sequence[int], pos: int) -> tuple[int, Any] | None:
    """(name length in tokens, payload) of the longest name starting at ``tokens[pos]``, or None."""
    for ids, payload in lookup.get(tokens[pos], ()):
        if tuple(tokens[pos:pos + len(ids)]) == ids:
            return len(ids), payload
    return None


class EmbeddingMatcher:
    """Matches the names of `embeddings` in token streams (see the module docstring).

    tokenizer: the model's tokenizer (``tokenize(texts) -> list[list[int]]``, no special tokens).
    embeddings: objects with ``name`` and ``num_vectors``; if two share a name, the later one wins
    (as a later registration replaces an earlier one in the WebUI).
    """

    def __init__(self, tokenizer, embeddings: Iterable[Any]):
        by_name = {e.name: e for e in embeddings}
        names = list(by_name)
        ids = tokenizer.tokenize(names) if names else []
        self.unmatchable = [name for name, name_ids in zip(names, ids) if not name_ids]
        """Names that tokenize to nothing (only characters the tokenizer drops): no prompt can use them."""
        self._lookup = build_ids_lookup((name_ids, by_name[name]) for name, name_ids in zip(names, ids))

    def find_at(self, tokens: Sequence[int], pos: int) -> tuple[int, int, Any] | None:
        """(name length in tokens, vectors, embedding) if an embedding's name starts at ``tokens[pos]``."""
        found = find_in_lookup(self._lookup, tokens, pos)
        if found is None:
            return None
        length, embedding = found
        return length, embedding.num_vectors, embedding

    def find_all(self, tokens: Sequence[int]) -> list[Any]:
        """Every embedding used in a token stream, in order of appearance (scanning as the chunker does)."""
        used, pos = [], 0
        while pos < len(tokens):
            match = self.find_at(tokens, pos)
            if match is None:
                pos += 1
            else:
                used.append(match[2])
                pos += match[0]
        return used
