"""CLIP BPE tokenizers built offline, with the WebUI's two tokenization semantics.

Every Stable Diffusion text encoder uses the same 49408-entry CLIP BPE vocabulary, and ``open_clip``
ships it (``open_clip/bpe_simple_vocab_16e6.txt.gz``), so nothing has to be downloaded:

- ``make_tokenizer("clip")`` — SD1 (and SDXL's CLIP-L). The WebUI uses transformers' ``CLIPTokenizer``
  from ``openai/clip-vit-large-patch14``. We write that tokenizer's ``vocab.json``/``merges.txt`` from
  open_clip's BPE file into a cache folder (once, atomically) and load a real ``CLIPTokenizer`` from them.
  Text cleaning: ``ftfy.fix_text``, whitespace collapsed, lower-cased.
- ``make_tokenizer("open_clip")`` — SD2 (and SDXL's OpenCLIP-G). The WebUI uses open_clip's
  ``SimpleTokenizer``. Same ids, but its cleaning also html-unescapes twice (``&amp;`` becomes ``&``),
  and chunks are padded with id 0 after the first end token instead of with the end token.

Both expose ``tokenize(texts) -> list[list[int]]`` (no start/end tokens, no truncation), ``id_start``,
``id_end``, ``id_pad``, ``comma_token``, vocabulary lookups and ``decode`` (for debugging).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

from ..atomic import write_text
from ..cache_dir import CACHE_ENV, default_cache_dir
from ..errors import AlchemyError

ID_START = 49406
ID_END = 49407
VOCAB_SIZE = 49408
# CLIP keeps only the first merges of the BPE file: 49152 minus the 256 byte symbols and 2 specials.
N_MERGES = 49152 - 256 - 2
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
KINDS = ("clip", "open_clip")


def bpe_vocab_path() -> Path:
    """Path of the BPE merges file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / BPE_FILE_NAME
        if path.is_file():
            return path
    raise AlchemyError(f"open_clip's CLIP vocabulary ({BPE_FILE_NAME}) was not found",
                       path=folders[0] if folders else None,
                       fix="install it with: pip install open-clip-torch==2.20.0")


def read_merges(bpe_path: str | os.PathLike) -> list[tuple[str, str]]:
    """The BPE merges CLIP uses, in rank order (the file's first line is a header)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1:N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise AlchemyError(f"expected {N_MERGES} BPE merges of two symbols each", path=bpe_path,
                           fix="reinstall open-clip-torch; the vocabulary file is damaged")
    return merges


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id map: 256 byte symbols, the same with ``</w>``, one entry per merge, 2 specials."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def ensure_hf_clip_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding ``vocab.json`` and ``merges.txt`` of openai/clip-vit-large-patch14's tokenizer.

    Generated from open_clip's BPE file on first use; each file is written atomically, so a folder
    with both files present is always complete and is reused as is.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "tokenizers" / "clip-vit-large-patch14"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return folder
    merges = read_merges(bpe_vocab_path())
    try:
        write_text(merges_file, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        write_text(vocab_file, json.dumps(clip_vocab(merges), ensure_ascii=False))
    except OSError as exc:
        raise AlchemyError(f"cannot write the tokenizer cache ({exc.strerror})", path=folder,
                           fix=f"make it writable or point {CACHE_ENV} at a writable folder") from exc
    return folder


class _ClipBpe:
    """Shared lookups; subclasses set ``wrapped``, ``vocab`` and ``id_pad``."""

    id_start = ID_START
    id_end = ID_END
    id_pad: int
    vocab: dict[str, int]

    def __init__(self) -> None:
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self.comma_token = self.vocab[",</w>"]

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._id_to_token[token_id]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


class HFClipTokenizer(_ClipBpe):
    """SD1 semantics: a transformers ``CLIPTokenizer`` (``.wrapped``), padding chunks with the end token."""

    id_pad = ID_END

    def __init__(self, folder: Path):
        from transformers import CLIPTokenizer

        # model_max_length as in the hub's tokenizer_config.json, for code that pads with it.
        self.wrapped = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
        # Long prompts are chunked, not truncated: silence the "sequence is longer than 77" warning.
        self.wrapped.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        if self.wrapped.fix_text is None:
            # Without ftfy transformers silently falls back to a BERT-style cleaner with other ids.
            raise AlchemyError("the 'ftfy' package is missing, so prompts would tokenize differently from the WebUI",
                               fix="pip install ftfy")
        self.vocab = self.wrapped.get_vocab()
        super().__init__()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.wrapped(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.wrapped.decode(list(ids))


class OpenClipTokenizer(_ClipBpe):
    """SD2 semantics: open_clip's ``SimpleTokenizer`` (``.wrapped``); chunks pad with 0 after the end token."""

    id_pad = 0

    def __init__(self, bpe_path: Path):
        from open_clip.tokenizer import SimpleTokenizer

        self.wrapped = SimpleTokenizer(str(bpe_path))
        self.vocab = self.wrapped.encoder
        super().__init__()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.wrapped.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.wrapped.decode(list(ids)).strip()


def make_tokenizer(kind: str, cache_dir: str | os.PathLike | None = None) -> HFClipTokenizer | OpenClipTokenizer:
    """A tokenizer with the WebUI's semantics: ``"clip"`` (SD1) or ``"open_clip"`` (SD2).

    cache_dir: where the "clip" tokenizer's generated files live (default :func:`default_cache_dir`).
    """
    if kind == "clip":
        return HFClipTokenizer(ensure_hf_clip_files(cache_dir))
    if kind == "open_clip":
        return OpenClipTokenizer(bpe_vocab_path())
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
