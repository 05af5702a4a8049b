"""An independent re-statement, for tests, of how a stock WebUI v1.10.1 turns prompts into conditioning:
``modules/prompt_parser.py`` (``parse_prompt_attention``), ``modules/sd_hijack_clip.py``
(``tokenize_line``, ``process_texts``, ``forward``, ``process_tokens``, ``empty_chunk``) and
``modules/sd_emphasis.py`` (the four emphasis modes).

Written from the host's code read for facts (shared/reference/a1111-host.md 3.2-3.3), deliberately NOT
using extensions_lib: the stand-in host's prompt wrapper runs on this module, and tests hold
``extensions_lib.prompt`` against it. Behaviour the host has and we chose not to copy stays here on
purpose (e.g. "Original" emphasis divides by the new mean even when it is 0).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

CHUNK_LENGTH = 75

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_UP, _DOWN = 1.1, 1 / 1.1


def host_parse_prompt_attention(text: str) -> list[list]:
    """[[text, weight], ...] with ``["BREAK", -1]`` where the keyword stood (prompt_parser's rules)."""
    out: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(out))
        elif piece == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), _UP)
        elif piece == "]" and squares:
            scale(squares.pop(), _DOWN)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, _UP)
    for start in squares:
        scale(start, _DOWN)
    if not out:
        out = [["", 1.0]]
    i = 0  # neighbours of equal weight are joined (two BREAKs in a row are too: both weigh -1)
    while i + 1 < len(out):
        if out[i][1] == out[i + 1][1]:
            out[i][0] += out[i + 1][0]
            del out[i + 1]
        else:
            i += 1
    return out


@dataclass
class HostChunk:
    tokens: list = field(default_factory=list)
    multipliers: list = field(default_factory=list)
    fixes: list = field(default_factory=list)  # (offset, embedding) pairs


def host_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str) -> torch.Tensor:
    """sd_emphasis: "None" and "Ignore" leave z; "No norm" scales rows; anything else is "Original"
    (scale rows, then rescale to the old mean)."""
    if mode in ("None", "Ignore"):
        return z
    scaled = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    if mode == "No norm":
        return scaled
    return scaled * (z.mean() / scaled.mean())


class HostPromptWrapper:
    """The host's ``FrozenCLIPEmbedderWithCustomWordsBase`` prompt logic, for a subclass that provides
    ``tokenize``, ``encode_with_transformers``, ``id_start/id_end/id_pad/comma_token``, ``hijack`` (with
    ``embedding_db``, ``fixes``, ``extra_generation_params``) and ``host_opts()`` (the ``shared.opts``)."""

    chunk_length = CHUNK_LENGTH
    carry_fixes_on_backtrack = False
    """The host's comma backtrack moves the tail's tokens and multipliers to the next chunk but leaves their
    embedding fixes behind (offsets now past the chunk's text: the vectors land on padding rows, the moved
    placeholders encode as token 0). True: the fixes move with their tokens, which is what we do."""

    def host_opts(self):
        raise NotImplementedError

    def empty_chunk(self) -> HostChunk:
        return HostChunk([self.id_start] + [self.id_end] * (self.chunk_length + 1), [1.0] * (self.chunk_length + 2))

    def get_target_prompt_token_count(self, token_count: int) -> int:
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize_line(self, line: str):
        opts = self.host_opts()
        parsed = host_parse_prompt_attention(line) if opts.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks: list[HostChunk] = []
        state = {"chunk": HostChunk(), "count": 0, "comma": -1}

        def close(is_last: bool = False) -> None:
            chunk = state["chunk"]
            state["count"] += len(chunk.tokens) if is_last else self.chunk_length
            missing = self.chunk_length - len(chunk.tokens)
            if missing > 0:
                chunk.tokens += [self.id_end] * missing
                chunk.multipliers += [1.0] * missing
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            state["comma"] = -1
            chunks.append(chunk)
            state["chunk"] = HostChunk()

        backtrack = opts.comma_padding_backtrack
        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                close()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                chunk = state["chunk"]
                if token == self.comma_token:
                    state["comma"] = len(chunk.tokens)
                elif (backtrack != 0 and len(chunk.tokens) == self.chunk_length and state["comma"] != -1
                      and len(chunk.tokens) - state["comma"] <= backtrack):
                    cut = state["comma"] + 1
                    moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    moved_fixes = []
                    if self.carry_fixes_on_backtrack:
                        moved_fixes = [(off - cut, emb) for off, emb in chunk.fixes if off >= cut]
                        chunk.fixes = [(off, emb) for off, emb in chunk.fixes if off < cut]
                    close()
                    state["chunk"].tokens, state["chunk"].multipliers = moved_tokens, moved_mults
                    state["chunk"].fixes = moved_fixes
                if len(state["chunk"].tokens) == self.chunk_length:
                    close()
                embedding, name_length = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
                chunk = state["chunk"]
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                vectors = int(embedding.vectors)
                if len(chunk.tokens) + vectors > self.chunk_length:
                    close()
                    chunk = state["chunk"]
                chunk.fixes.append((len(chunk.tokens), embedding))
                chunk.tokens += [0] * vectors
                chunk.multipliers += [weight] * vectors
                position += name_length
        if state["chunk"].tokens or not chunks:
            close(is_last=True)
        return chunks, state["count"]

    def process_texts(self, texts):
        seen: dict[str, list] = {}
        batch, count = [], 0
        for line in texts:
            if line not in seen:
                seen[line], n = self.tokenize_line(line)
                count = max(count, n)
            batch.append(seen[line])
        return batch, count

    def encoder_tokens(self, batch_tokens) -> torch.Tensor:
        """The chunk batch as process_tokens hands it to the encoder."""
        tokens = torch.asarray(batch_tokens)
        if self.id_end != self.id_pad:  # SD2: everything after the first end token becomes the pad id
            for row in range(len(batch_tokens)):
                first_end = batch_tokens[row].index(self.id_end)
                tokens[row, first_end + 1:] = self.id_pad
        return tokens

    def process_tokens(self, batch_tokens, batch_multipliers) -> torch.Tensor:
        z = self.encode_with_transformers(self.encoder_tokens(batch_tokens))
        return host_emphasis(z, torch.asarray(batch_multipliers).to(z.device), self.host_opts().emphasis)

    def forward(self, texts):
        batch, _ = self.process_texts(texts)
        used = {}
        zs = []
        for i in range(max(len(chunks) for chunks in batch)):
            row = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch]
            self.hijack.fixes = [chunk.fixes for chunk in row]
            for fixes in self.hijack.fixes:
                for _offset, embedding in fixes:
                    used[embedding.name] = embedding
            zs.append(self.process_tokens([c.tokens for c in row], [c.multipliers for c in row]))
        opts = self.host_opts()
        if opts.textual_inversion_add_hashes_to_infotext and used:
            hashes = [f"{name.replace(':', '').replace(',', '')}: {emb.shorthash}" for name, emb in used.items()
                      if emb.shorthash]
            if hashes:
                if self.hijack.extra_generation_params.get("TI hashes"):
                    hashes.append(self.hijack.extra_generation_params.get("TI hashes"))
                self.hijack.extra_generation_params["TI hashes"] = ", ".join(hashes)
        if any("(" in t or "[" in t for t in texts) and opts.emphasis != "Original":
            self.hijack.extra_generation_params["Emphasis"] = opts.emphasis
        return torch.hstack(zs)
