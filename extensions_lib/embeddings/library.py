"""An embeddings folder: every embedding file below it becomes a prompt word named after the file.

Files are found as the WebUI's ``EmbeddingDatabase`` finds them (recursive walk following symlinks;
``.pt``, ``.bin``, ``.safetensors`` and embedding images; ``*.preview.png`` skipped) and read with
:func:`extensions_lib.formats.embedding.read_embedding`. Unlike the host:

- :meth:`EmbeddingLibrary.refresh` notices files added, changed or removed anywhere below the folder
  (the host only looks at the top folder's mtime) and re-reads only files whose (inode, mtime, size)
  changed, so calling it before every encode is cheap;
- a file that cannot be used is listed in :attr:`EmbeddingLibrary.skipped` with the reason (unreadable,
  wrong width for the loaded model, SDXL on an SD1/SD2 model, too many vectors...), never an error in
  the middle of a generation. SDXL files are listed like any other.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AlchemyError
from ..folders import check_folder
from ..formats.embedding import HOST_EMBEDDING_SUFFIXES, IMAGE_SUFFIXES, Embedding, read_embedding
from ..prompt import CHUNK_LENGTH
from .matcher import EmbeddingMatcher

Stamp = tuple[int, int, int]
"""(inode, mtime in ns, size): a file whose stamp is unchanged is not read again."""

_FAMILY_BY_WIDTH = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


def model_widths(adapter) -> dict[str, int]:
    """{encoder key: token-embedding width} of a model ({"": 768} for SD1, {"clip_l": 768, "clip_g": 1280}
    for SDXL)."""
    return {info.key: int(info.width) for info in adapter.text_encoders}


def _family(width: int) -> str:
    name = _FAMILY_BY_WIDTH.get(width)
    return f" ({name})" if name else ""


def fit_problem(embedding: Embedding, widths: dict[str, int] | None) -> str | None:
    """Why `embedding` cannot be used with a model of these encoder widths, or None when it can.

    widths None means "no model": only problems independent of the model are reported.
    """
    if embedding.num_vectors < 1:
        return "holds no vectors"
    if embedding.num_vectors > CHUNK_LENGTH:
        return f"has {embedding.num_vectors} vectors; a prompt chunk holds at most {CHUNK_LENGTH}"
    tensors = embedding.vectors.values() if embedding.is_sdxl else [embedding.vectors]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "contains NaN or infinite values"
    if widths is None:
        return None
    if set(widths) == {""}:
        width = widths[""]
        if embedding.is_sdxl:
            return f"is an SDXL embedding (clip_l + clip_g); the loaded model is not SDXL (width {width}{_family(width)})"
        if embedding.width != width:
            return (f"vectors are {embedding.width} wide{_family(embedding.width)}; the loaded model's text encoder "
                    f"takes {width}{_family(width)}")
        return None
    if not embedding.is_sdxl:
        return (f"holds one {embedding.width}-wide tensor{_family(embedding.width)}; this SDXL model needs "
                f"{' and '.join(sorted(widths))} vectors")
    for key, width in widths.items():
        tensor = embedding.vectors.get(key)
        if tensor is None or tensor.shape[-1] != width:
            got = "missing" if tensor is None else f"{tensor.shape[-1]} wide"
            return f"its {key} vectors are {got}; the loaded model's {key} encoder takes {width}"
    return None


@dataclass(frozen=True)
class LibraryEntry:
    """One file. `error` is None when the embedding is usable, else why it is skipped."""

    name: str
    path: Path
    stamp: Stamp
    embedding: Embedding | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None

    @property
    def kind(self) -> str:
        """"SDXL", "SD1", "SD2", "width N", or "unreadable"."""
        if self.embedding is None:
            return "unreadable"
        if self.embedding.is_sdxl:
            return "SDXL"
        return _FAMILY_BY_WIDTH.get(self.embedding.width, f"width {self.embedding.width}").strip()

    def describe(self) -> str:
        """One line for listings: ``name (kind, n vectors) path``, plus the reason when skipped."""
        vectors = f", {self.embedding.num_vectors} vectors" if self.embedding is not None else ""
        text = f"{self.name} ({self.kind}{vectors}) {self.path}"
        return f"{text}: skipped, {self.error}" if self.error else text


def _is_candidate_name(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix not in HOST_EMBEDDING_SUFFIXES:
        return False
    return not (suffix in IMAGE_SUFFIXES and path.stem.lower().endswith(".preview"))


def scan_files(directory: Path) -> list[tuple[Path, Stamp]]:
    """(path, stamp) of every candidate file below `directory`, paths sorted case-insensitively.

    Symlinked folders are followed (as the host does) but each real folder is visited once, so a link
    cycle cannot hang the walk.
    """
    found: list[tuple[Path, Stamp]] = []
    visited: set[str] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort(key=str.lower)
        for name in files:
            path = Path(root, name)
            if not _is_candidate_name(path):
                continue
            try:
                st = path.stat()
            except OSError:  # vanished, or a dangling link
                continue
            if path.is_file():
                found.append((path, (st.st_ino, st.st_mtime_ns, st.st_size)))
    found.sort(key=lambda item: str(item[0]).lower())
    return found


def _read(path: Path, stamp: Stamp) -> tuple[Embedding | None, str | None]:
    if stamp[2] == 0:
        return None, "empty file"
    try:
        return read_embedding(path), None
    except AlchemyError as exc:
        return None, exc.what + (f" ({exc.fix})" if exc.fix else "")
    except Exception as exc:  # noqa: BLE001 — torn write, vanished, odd content: one file never breaks a listing
        return None, f"could not be read: {type(exc).__name__}: {exc}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EmbeddingLibrary:
    """The embeddings of one folder, optionally checked against a loaded model.

    widths: the model's encoder widths (:func:`model_widths`); None lists everything readable.
    tokenizer: the model's tokenizer, for :meth:`matcher` (and to reject names that tokenize to nothing).
    """

    def __init__(self, directory: str | os.PathLike, widths: dict[str, int] | None = None, tokenizer=None):
        self.directory = Path(directory)  # a file here lists nothing (listings never fail); entry() says why
        self.widths = dict(widths) if widths is not None else None
        self.tokenizer = tokenizer
        self._files: dict[Path, tuple[Stamp, Embedding | None, str | None]] = {}
        self._entries: list[LibraryEntry] = []
        self._by_name: dict[str, LibraryEntry] = {}
        self._matcher: EmbeddingMatcher | None = None
        self._hashes: dict[Path, tuple[Stamp, str]] = {}
        self.refresh()

    @classmethod
    def for_model(cls, directory: str | os.PathLike, adapter) -> "EmbeddingLibrary":
        """A library checked against `adapter`'s text encoders and matched with its tokenizer."""
        return cls(directory, model_widths(adapter), adapter.tokenizer)

    # --- scanning ----------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Rescan the folder; True when anything was added, changed or removed since the last scan."""
        found = scan_files(self.directory) if self.directory.is_dir() else []
        files: dict[Path, tuple[Stamp, Embedding | None, str | None]] = {}
        for path, stamp in found:
            old = self._files.get(path)
            files[path] = old if old is not None and old[0] == stamp else (stamp, *_read(path, stamp))
        changed = files.keys() != self._files.keys() or any(files[p][0] != self._files[p][0] for p in files)
        if changed:
            self._files = files
            self._rebuild()
        return changed

    def _rebuild(self) -> None:
        entries: list[LibraryEntry] = []
        for path, (stamp, embedding, error) in self._files.items():
            name = embedding.name if embedding is not None else path.stem
            if error is None:
                try:
                    error = fit_problem(embedding, self.widths)
                except Exception as exc:  # noqa: BLE001 — a shape or value no check above foresaw
                    error = f"could not be checked: {type(exc).__name__}: {exc}"
            entries.append(LibraryEntry(name, path, stamp, embedding, error))
        if self.tokenizer is not None:
            usable = [e for e in entries if e.usable]
            empty = set(EmbeddingMatcher(self.tokenizer, [e.embedding for e in usable]).unmatchable)
            entries = [_skip(e, "its name has no tokens, so no prompt can use it") if e.usable and e.name in empty
                       else e for e in entries]
        index_by_name: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if not entry.usable:
                continue
            previous = index_by_name.get(entry.name)
            if previous is not None:  # the later file wins, as a later registration does in the host
                entries[previous] = _skip(entries[previous], f"another file has the same name: {entry.path}")
            index_by_name[entry.name] = i
        self._entries = entries
        self._by_name = {name: entries[i] for name, i in index_by_name.items()}
        self._matcher = None

    # --- listing -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names of the usable embeddings, sorted case-insensitively."""
        return sorted(self._by_name, key=str.lower)

    def entries(self) -> list[LibraryEntry]:
        """Every candidate file, usable or not, in path order."""
        return list(self._entries)

    @property
    def skipped(self) -> list[LibraryEntry]:
        return [e for e in self._entries if not e.usable]

    def entry(self, name: str) -> LibraryEntry:
        """The usable entry called `name`; AlchemyError explaining why when there is none."""
        found = self._by_name.get(name)
        if found is not None:
            return found
        skipped = [e for e in self._entries if e.name == name]
        if skipped:
            raise AlchemyError(f"embedding {name!r} cannot be used: {skipped[-1].error}", skipped[-1].path,
                               "replace the file with one made for this model")
        check_folder(self.directory, "the embeddings folder")
        known = ", ".join(self.names()[:20]) or "none"
        raise AlchemyError(f"no embedding named {name!r}", self.directory,
                           f"put {name}.pt in this folder or create it first (known: {known})")

    def get(self, name: str) -> Embedding:
        return self.entry(name).embedding

    def matcher(self) -> EmbeddingMatcher:
        """Matcher over the usable embeddings (rebuilt only after a refresh that changed something)."""
        if self.tokenizer is None:
            raise ValueError("this library has no tokenizer; build it with EmbeddingLibrary.for_model")
        if self._matcher is None:
            self._matcher = EmbeddingMatcher(self.tokenizer, [self._by_name[n].embedding for n in self.names()])
        return self._matcher

    def shorthash(self, name: str) -> str:
        """The host's short hash of an embedding file: sha256[:12] (what infotext's "TI hashes" shows)."""
        entry = self.entry(name)
        cached = self._hashes.get(entry.path)
        if cached is None or cached[0] != entry.stamp:
            cached = (entry.stamp, file_sha256(entry.path))
            self._hashes[entry.path] = cached
        return cached[1][:12]


def _skip(entry: LibraryEntry, reason: str) -> LibraryEntry:
    return LibraryEntry(entry.name, entry.path, entry.stamp, entry.embedding, reason)


