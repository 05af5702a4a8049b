"""An editing session over one dataset folder: select, preview, apply, undo, redo.

Every applied batch is saved at once, file by file, atomically (never a half-written caption), after
two safety nets are in place:
- a snapshot: the affected caption files as they were, copied to
  ``<dataset>/.alchemy-tags/snapshots/<time>-<label>/`` (plain files a user can copy back by hand);
- the journal ``<dataset>/.alchemy-tags/journal.json``: each batch's before/after texts, which undo and
  redo replay, also from another process (``alchemy tags undo`` after a tab edit).
A caption that changed on disk since it was read is left alone and reported (reload to see it), and an
edit that would empty a non-empty caption is refused for that file unless asked for: a wiped caption
is the classic loss in these tools. The hidden state folder is never listed as part of the dataset.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..atomic import write_text
from ..errors import AlchemyError
from .captions import DEFAULT_SEPARATOR, Entry, load_entries, read_caption
from .edits import Edit, apply_edit
from .filters import TagFilter
from .stats import tag_counts

STATE_DIR = ".alchemy-tags"
JOURNAL_VERSION = 1
KEEP_HISTORY = 50
KEEP_SNAPSHOTS = 20


@dataclass(frozen=True)
class Change:
    key: str
    before: str
    after: str


@dataclass
class ApplyResult:
    label: str
    changed: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image key, reason)
    snapshot: Path | None = None

    def summary(self) -> str:
        text = f"{self.label}: {len(self.changed)} caption(s) written"
        if self.skipped:
            text += f", {len(self.skipped)} left as they were"
        return text


class TagEditor:
    """Captions of the images in `folder` (see :mod:`.captions` for the lookup), kept in step with disk."""

    def __init__(self, folder: str | os.PathLike, *, recursive: bool = False, extension: str = ".txt",
                 separator: str = DEFAULT_SEPARATOR, keep_history: int = KEEP_HISTORY,
                 keep_snapshots: int = KEEP_SNAPSHOTS):
        self.folder = Path(folder).expanduser()
        self.recursive = recursive
        self.extension = extension
        self.separator = separator
        self.keep_history = keep_history
        self.keep_snapshots = keep_snapshots
        self.entries: dict[str, Entry] = {}
        self.skipped: list[tuple[str, str]] = []
        self.reload()

    # ---- reading ---------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.folder / STATE_DIR

    def reload(self) -> None:
        entries, self.skipped = load_entries(self.folder, recursive=self.recursive, extension=self.extension)
        self.entries = {e.key: e for e in entries}

    def entry(self, key: str) -> Entry:
        """The entry named `key` (a name from this listing only: never joined into a path)."""
        try:
            return self.entries[key]
        except KeyError:
            raise AlchemyError(f"no image {key!r} in this dataset", self.folder, "reload the folder") from None

    def select(self, flt: TagFilter = TagFilter(), keys: Sequence[str] | None = None) -> list[str]:
        """Keys of the entries matching `flt` (among `keys` when given), in listing order."""
        pool = self.entries if keys is None else [self.entry(k).key for k in keys]
        return [k for k in pool if flt.matches(self.entries[k].tags)]

    def counts(self, keys: Sequence[str] | None = None):
        keys = list(self.entries) if keys is None else keys
        return tag_counts(self.entries[k].tags for k in keys)

    # ---- editing ---------------------------------------------------------------------------------
    def preview(self, edit: Edit, keys: Sequence[str]) -> list[Change]:
        """What `edit` would change, without writing anything."""
        out = []
        for key in keys:
            before = self.entry(key).text
            after = apply_edit(edit, before, self.separator)
            if after != before:
                out.append(Change(key, before, after))
        return out

    def apply(self, edit: Edit, keys: Sequence[str], *, allow_empty: bool = False) -> ApplyResult:
        """Apply `edit` to `keys` and save (snapshot, then files, then journal)."""
        return self._commit(edit.describe(), self.preview(edit, keys), allow_empty=allow_empty)

    def set_caption(self, key: str, text: str, *, allow_empty: bool = False) -> ApplyResult:
        """Per-image edit: the caption of `key` becomes `text`."""
        return self.apply(Edit("set", text=text), [key], allow_empty=allow_empty)

    def _commit(self, label: str, changes: list[Change], *, allow_empty: bool, record: bool = True
                ) -> ApplyResult:
        result = ApplyResult(label)
        ready = []
        for change in changes:
            entry = self.entry(change.key)
            reason = self._conflict(entry, change.before)
            if reason is None and not change.after.strip() and change.before.strip() and not allow_empty:
                reason = "would leave the caption empty (allow empty captions to do this)"
            if reason:
                result.skipped.append((change.key, reason))
            else:
                ready.append(change)
        if not ready:
            return result
        try:
            result.snapshot = self._snapshot(label, ready)
        except OSError as exc:
            raise AlchemyError(f"could not write the backup snapshot ({exc}); nothing was changed", self.state_dir,
                               "make the dataset folder writable") from None
        for change in ready:
            entry = self.entries[change.key]
            try:
                if change.after or entry.caption_path.exists():
                    write_text(entry.caption_path, change.after)  # no newline, as the tagger writes
            except OSError as exc:
                result.skipped.append((change.key, f"could not write {entry.caption_path.name}: {exc}"))
                continue
            entry.text, entry.exists = change.after, entry.caption_path.exists()
            result.changed.append(change)
        if record and result.changed:
            self._record(label, result.changed)
        return result

    def _conflict(self, entry: Entry, expected: str) -> str | None:
        """Why the file is not what we last read (edited elsewhere), or None."""
        try:
            on_disk = read_caption(entry.caption_path) if entry.caption_path.exists() else ""
        except (OSError, ValueError) as exc:
            return f"caption unreadable now ({exc})"
        if on_disk != expected:
            entry.text, entry.exists = on_disk, entry.caption_path.exists()
            return "changed on disk since it was read (reloaded; edit again)"
        return None

    # ---- snapshots -------------------------------------------------------------------------------
    def _snapshot(self, label: str, changes: Sequence[Change]) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:40] or "edit"
        root = self.state_dir / "snapshots"
        target = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000:06d}-{slug}"
        manifest = []
        for change in changes:
            entry = self.entries[change.key]
            rel = entry.caption_path.relative_to(self.folder)
            if entry.caption_path.exists():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(entry.caption_path, target / rel)
            manifest.append({"image": change.key, "caption": rel.as_posix(), "existed": entry.caption_path.exists()})
        target.mkdir(parents=True, exist_ok=True)
        write_text(target / "snapshot.json", json.dumps({"label": label, "files": manifest}, indent=1))
        old = sorted(p for p in root.iterdir() if p.is_dir())
        for stale in old[:max(0, len(old) - self.keep_snapshots)]:
            shutil.rmtree(stale, ignore_errors=True)
        return target

    # ---- journal ---------------------------------------------------------------------------------
    def _journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    def _load_journal(self) -> dict:
        path = self._journal_path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") == JOURNAL_VERSION and isinstance(data.get("batches"), list):
                data["position"] = max(0, min(int(data.get("position", 0)), len(data["batches"])))
                return data
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return {"version": JOURNAL_VERSION, "batches": [], "position": 0}

    def _save_journal(self, data: dict) -> None:
        write_text(self._journal_path(), json.dumps(data, ensure_ascii=False))

    def _record(self, label: str, changes: Sequence[Change]) -> None:
        data = self._load_journal()
        batches = data["batches"][:data["position"]]  # a new edit drops the redo branch
        batches.append({"label": label, "time": time.time(),
                        "changes": [[c.key, c.before, c.after] for c in changes]})
        batches = batches[-self.keep_history:]
        self._save_journal({"version": JOURNAL_VERSION, "batches": batches, "position": len(batches)})

    def history(self) -> tuple[list[str], int]:
        """(labels of the journal's batches, how many of them are applied)."""
        data = self._load_journal()
        return [b.get("label", "?") for b in data["batches"]], data["position"]

    def undo(self) -> ApplyResult | None:
        """Put back the captions of the last applied batch (None: nothing to undo)."""
        return self._step(-1)

    def redo(self) -> ApplyResult | None:
        return self._step(+1)

    def _step(self, direction: int) -> ApplyResult | None:
        data = self._load_journal()
        index = data["position"] - 1 if direction < 0 else data["position"]
        if not 0 <= index < len(data["batches"]):
            return None
        batch = data["batches"][index]
        changes = []
        for key, before, after in batch["changes"]:
            if key not in self.entries:
                continue  # the image is gone; nothing to restore
            changes.append(Change(key, after, before) if direction < 0 else Change(key, before, after))
        verb = "undo" if direction < 0 else "redo"
        result = self._commit(f"{verb} {batch.get('label', '')}".strip(), changes, allow_empty=True, record=False)
        if result.changed or not result.skipped:  # a step that restored nothing stays where it was
            data["position"] = index if direction < 0 else index + 1
            self._save_journal(data)
        return result
