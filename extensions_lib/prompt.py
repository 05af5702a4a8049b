"""Prompts -> text conditioning with the WebUI's rules (emphasis, BREAK, 75-token chunks, embeddings).

Pipeline, one small function per step::

    parse_prompt_attention(text)      "a (cat:1.2)" -> [("a ", 1.0), ("cat", 1.2)]
    tokenize_segments(...)            each segment -> token ids (BREAK kept as a marker)
    split_into_chunks(...)            -> [PromptChunk]: 77 tokens/multipliers each, plus embedding fixes
    encode_prompts(adapter, prompts)  -> (B, 77*k, C), emphasis applied per chunk

Textual-inversion embeddings plug in through two hooks that keep this module host-agnostic:

- a *matcher* (:class:`EmbeddingMatcher`) recognises an embedding's name in the token stream; the
  chunker reserves ``vectors_count`` placeholder tokens (id 0) and records ``(offset, payload)`` in the
  chunk's ``fixes`` (offset counts from the first token after the start token, as in the WebUI);
- while each batch of chunks is encoded, :func:`active_fixes` returns the per-row fixes, so a wrapper
  around the encoder's token-embedding module can splice ``payload``'s vectors into rows
  ``offset + 1 ...`` of its output. It is a ``contextvars.ContextVar`` (the only state here): None
  outside :func:`encode_prompts`, thread- and task-safe, restored even when encoding raises.

Deliberate differences from the WebUI (v1.10.1), all in cases where it misbehaves:
- ``BREAK`` inside brackets still breaks (the WebUI scales its -1 marker and then encodes the word);
- a weight that is not a number, like ``(a:1.2.3)``, is kept as text (the WebUI raises);
- comma backtracking moves embedding fixes along with their placeholder tokens (the WebUI leaves the
  fix behind, pointing into padding).
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from .errors import AlchemyError

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; with the start and end tokens a chunk is 77 long."""
COMMA_BACKTRACK = 20
"""The WebUI's ``comma_padding_backtrack`` default."""
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
"""The WebUI's ``emphasis`` setting: Original = scale per token then restore the mean; No norm = scale
only; Ignore = parse the syntax but do not scale; None = no syntax at all (brackets are text)."""
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)
"""Marker segment for the ``BREAK`` keyword (the WebUI's own representation); test for it with ``is``."""

Fix = tuple[int, Any]
"""(offset of the first placeholder token, counted after the start token; the matcher's payload)"""

# Order matters: escapes first, then brackets, the ":weight)" closer, plain text, and a lone ":".
_ATTENTION = re.compile(r"""
    \\[()\[\]\\]? |                 # escaped bracket or backslash; a lone backslash is dropped
    \( | \[ |
    :\s*(?P<weight>[+-]?[.\d]+)\s*\) |
    \) | ] |
    [^\\()\[\]:]+ |
    :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

_active_fixes: contextvars.ContextVar[list[list[Fix]] | None] = contextvars.ContextVar(
    "alchemy_active_fixes", default=None)


# --- parsing --------------------------------------------------------------------------------------

def _split_breaks(text: str) -> list[str | None]:
    """Plain text -> its pieces with None where a ``BREAK`` keyword stood."""
    pieces: list[str | None] = []
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            pieces.append(None)
        pieces.append(part)
    return pieces


def _as_float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _merge_equal_weights(segments: list) -> list[tuple[str, float]]:
    """Join neighbouring segments of equal weight, as the host does (BREAK markers included: they are
    ``["BREAK", -1]`` entries there); an entry still ``("BREAK", -1)`` afterwards is the :data:`BREAK` marker."""
    merged: list = []
    for seg in segments:
        if merged and seg[1] == merged[-1][1]:
            merged[-1][0] += seg[0]
        else:
            merged.append(seg)
    return [BREAK if seg[0] == BREAK[0] and seg[1] == BREAK[1] else tuple(seg) for seg in merged]


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments using the WebUI's emphasis syntax.

    ``(a)`` x1.1, ``[a]`` /1.1, ``(a:1.3)`` x1.3, nesting multiplies, unclosed brackets apply to the
    rest, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, stray closers are text, and each ``BREAK``
    keyword becomes the :data:`BREAK` object itself (test with ``is``). Adjacent segments of equal weight
    are merged. As in the host, a BREAK is a weight -1 entry until the end: inside brackets it is scaled and
    so becomes the text "BREAK" with that (negative) weight, not a chunk break.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    segments: list = []  # [text, weight] lists (brackets scale them in place); ["BREAK", -1.0] for the keyword
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for seg in segments[start:]:
            seg[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), _as_float(m.group("weight"))
        if token.startswith("\\"):
            segments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(segments))
        elif token == "[":
            open_square.append(len(segments))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            segments += [list(BREAK) if piece is None else [piece, 1.0] for piece in _split_breaks(token)]
    # Unclosed brackets, outermost first, round before square (the order decides the float rounding).
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(segments) or [("", 1.0)]


# --- chunking -------------------------------------------------------------------------------------

class EmbeddingMatcher(Protocol):
    def find_at(self, tokens: Sequence[int], pos: int) -> tuple[int, int, Any] | None:
        """If an embedding's name starts at ``tokens[pos]``: (name length in tokens, vectors, payload)."""
        ...


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a text encoder pads chunks with (see :class:`extensions_lib.adapter.TextEncoderInfo`)."""

    start: int = 49406
    end: int = 49407
    pad: int = 49407
    comma: int = 267

    @classmethod
    def of(cls, source: Any) -> "SpecialTokens":
        """From anything with ``id_start``/``id_end``/``id_pad``/``comma_token`` (encoder info, tokenizer)."""
        return cls(source.id_start, source.id_end, source.id_pad, source.comma_token)


@dataclass
class PromptChunk:
    """One 77-token chunk: ids (start + 75 + end, padded), per-token multipliers, embedding fixes."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)


def close_chunk(tokens: list[int], multipliers: list[float], fixes: list[Fix], ids: SpecialTokens) -> PromptChunk:
    """Pad up to 75 tokens with the end token, add start/end, then pad with ``ids.pad`` after the first end.

    The last step only matters for SD2 (pad 0); it mirrors the WebUI, which pads with the end token
    and then overwrites everything after the first end token.
    """
    fill = CHUNK_LENGTH - len(tokens)
    full = [ids.start] + tokens + [ids.end] * fill + [ids.end]
    if ids.pad != ids.end:
        first_end = full.index(ids.end)
        full = full[:first_end + 1] + [ids.pad] * (len(full) - first_end - 1)
    return PromptChunk(full, [1.0] + multipliers + [1.0] * (fill + 1), list(fixes))


def empty_chunk(ids: SpecialTokens) -> PromptChunk:
    """The chunk used to even out chunk counts across a batch (the WebUI's ``empty_chunk``)."""
    return close_chunk([], [], [], ids)


class _ChunkBuilder:
    """The chunk being filled, and the finished ones."""

    def __init__(self, ids: SpecialTokens):
        self.ids = ids
        self.done: list[PromptChunk] = []
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[Fix] = []
        self.last_comma = -1

    def close(self) -> None:
        self.done.append(close_chunk(self.tokens, self.multipliers, self.fixes, self.ids))
        self.tokens, self.multipliers, self.fixes, self.last_comma = [], [], [], -1

    def break_after_last_comma(self) -> None:
        """Close the chunk after its last comma and carry the tokens behind it into the next chunk."""
        cut = self.last_comma + 1
        tokens, multipliers = self.tokens[cut:], self.multipliers[cut:]
        moved = [(offset - cut, payload) for offset, payload in self.fixes if offset >= cut]
        self.fixes = [fix for fix in self.fixes if fix[0] < cut]
        del self.tokens[cut:], self.multipliers[cut:]
        self.close()
        self.tokens, self.multipliers, self.fixes = tokens, multipliers, moved

    def add(self, tokens: list[int], weight: float) -> None:
        self.tokens += tokens
        self.multipliers += [weight] * len(tokens)


def split_into_chunks(segments: Sequence[tuple[list[int], float] | None], ids: SpecialTokens,
                      matcher: EmbeddingMatcher | None = None,
                      comma_backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """Token segments (None = BREAK) -> 77-token chunks, following the WebUI's ``tokenize_line``.

    A full chunk whose last comma is at most ``comma_backtrack`` tokens back is cut after that comma;
    0 disables this. An embedding that does not fit in the current chunk starts a new one.
    """
    chunk = _ChunkBuilder(ids)
    for segment in segments:
        if segment is None:
            chunk.close()
            continue
        tokens, weight = segment
        pos = 0
        while pos < len(tokens):
            if tokens[pos] == ids.comma:
                chunk.last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK_LENGTH and chunk.last_comma != -1
                  and len(chunk.tokens) - chunk.last_comma <= comma_backtrack):
                chunk.break_after_last_comma()
            if len(chunk.tokens) == CHUNK_LENGTH:
                chunk.close()
            match = matcher.find_at(tokens, pos) if matcher is not None else None
            if match is None:
                chunk.add([tokens[pos]], weight)
                pos += 1
                continue
            pos += _add_embedding(chunk, match, weight)
    if chunk.tokens or not chunk.done:
        chunk.close()
    return chunk.done


def _add_embedding(chunk: _ChunkBuilder, match: tuple[int, int, Any], weight: float) -> int:
    """Reserve placeholder tokens for a matched embedding; returns how many prompt tokens it consumed."""
    name_length, vectors, payload = match
    if name_length < 1:
        raise ValueError(f"embedding matcher returned a name length of {name_length}; it must be at least 1")
    if vectors > CHUNK_LENGTH:
        name = getattr(payload, "name", payload)
        raise AlchemyError(f"embedding {name!r} has {vectors} vectors; a prompt chunk holds at most {CHUNK_LENGTH}",
                           fix="use an embedding with fewer vectors per token")
    if len(chunk.tokens) + vectors > CHUNK_LENGTH:
        chunk.close()
    chunk.fixes.append((len(chunk.tokens), payload))
    chunk.add([0] * vectors, weight)
    return name_length


def tokenize_segments(tokenizer, prompt: str, emphasis: str = "Original") -> list[tuple[list[int], float] | None]:
    """Parse (unless emphasis is "None") and tokenize each segment; None stands for BREAK."""
    parsed = [(prompt, 1.0)] if emphasis == "None" else parse_prompt_attention(prompt)
    ids = iter(tokenizer.tokenize([segment[0] for segment in parsed if segment is not BREAK]))
    return [None if segment is BREAK else (next(ids), segment[1]) for segment in parsed]


def chunk_prompt(tokenizer, prompt: str, ids: SpecialTokens, matcher: EmbeddingMatcher | None = None,
                 emphasis: str = "Original", comma_backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """One prompt -> its chunks (at least one)."""
    return split_into_chunks(tokenize_segments(tokenizer, prompt, emphasis), ids, matcher, comma_backtrack)


# --- encoding -------------------------------------------------------------------------------------

def active_fixes() -> list[list[Fix]] | None:
    """Per-row embedding fixes of the chunk batch being encoded right now, or None outside encoding.

    Row i holds the ``(offset, payload)`` pairs of row i of the (N, 77) token tensor passed to
    ``adapter.encode_token_chunks``; a fix's vectors belong at rows ``offset + 1`` onwards of the
    token-embedding output (the +1 skips the start token).
    """
    return _active_fixes.get()


@contextlib.contextmanager
def fixes_active(fixes: list[list[Fix]]) -> Iterator[None]:
    """Make ``fixes`` what :func:`active_fixes` returns for the duration of the block."""
    token = _active_fixes.set(fixes)
    try:
        yield
    finally:
        _active_fixes.reset(token)


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """Scale each token's conditioning row by its multiplier (z: (N, T, C), multipliers: (N, T)).

    "Original" then rescales the whole batch to its previous mean, as the WebUI does. All multipliers 1
    leave `z` as it is: there the WebUI's rescale is a factor of exactly 1, except on an encoder whose
    output has mean 0 (a default-initialised final LayerNorm), where its 0/0 would turn everything NaN.
    """
    if mode in ("Ignore", "None") or bool((multipliers == 1).all()):
        return z
    scaled = z.float() * multipliers.to(z.device, torch.float32).unsqueeze(-1)
    if mode == "Original":
        scaled = scaled * _mean_restoring_factor(z.float().mean(), scaled.mean())
    return scaled.to(z.dtype)


def _mean_restoring_factor(original_mean: torch.Tensor, new_mean: torch.Tensor) -> torch.Tensor:
    """``original_mean / new_mean`` (the WebUI's factor), or 1 where a mean of 0 makes scaling back to it
    meaningless: 0/0 is NaN, x/0 infinite, 0/x would zero the whole conditioning. Branch-free, so
    CUDA need not sync and no NaN reaches the backward pass."""
    usable = (original_mean != 0) & (new_mean != 0)
    one = torch.ones_like(new_mean)
    factor = torch.where(usable, original_mean, one) / torch.where(usable, new_mean, one)
    return torch.where(torch.isfinite(factor), factor, one)


def even_out_chunks(batch: list[list[PromptChunk]], ids: SpecialTokens) -> list[list[PromptChunk]]:
    """Pad every prompt's chunk list with empty chunks up to the longest one."""
    count = max(len(chunks) for chunks in batch)
    return [chunks + [empty_chunk(ids) for _ in range(count - len(chunks))] for chunks in batch]


def encode_prompts(adapter, prompts: Sequence[str], clip_skip: int = 1, matcher: EmbeddingMatcher | None = None,
                   emphasis: str = "Original", comma_backtrack: int = COMMA_BACKTRACK) -> torch.Tensor:
    """Encode prompts to (B, 77*k, C) conditioning through ``adapter.encode_token_chunks``.

    Chunk i of every prompt is encoded together (prompts with fewer chunks get empty ones), with
    :func:`active_fixes` set to that batch's fixes. Gradients flow (textual-inversion training uses this).
    """
    if emphasis not in EMPHASIS_MODES:
        raise AlchemyError(f"unknown emphasis mode {emphasis!r}", fix=f"use one of {', '.join(EMPHASIS_MODES)}")
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    ids = SpecialTokens.of(adapter.text_encoders[0])
    batch = even_out_chunks([chunk_prompt(adapter.tokenizer, p, ids, matcher, emphasis, comma_backtrack)
                             for p in prompts], ids)
    zs = []
    for rows in zip(*batch):
        tokens = torch.tensor([chunk.tokens for chunk in rows], dtype=torch.long)
        with fixes_active([chunk.fixes for chunk in rows]):
            z = adapter.encode_token_chunks(tokens, clip_skip=clip_skip)
        zs.append(apply_emphasis(z, torch.tensor([chunk.multipliers for chunk in rows]), emphasis))
    return torch.cat(zs, dim=1)
