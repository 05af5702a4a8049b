"""How our embeddings and hypernetworks reach the WebUI's generations.

Embeddings: through the host's own embedding database (``sd_hijack.model_hijack.embedding_db``). Our
embeddings folder is added to its folders when it is not one of them already, and the database is
reloaded after we write a file; prompts then use embeddings exactly as the host's own, with nothing of
ours patched into the text encoder (so nothing is applied twice).

Hypernetworks (the settings toggle: a hypernetwork and a strength):

- host path, where the host has ``shared.loaded_hypernetworks`` and the ``hypernet`` extra network: the
  toggle adds ``<hypernet:NAME:STRENGTH>`` to each batch's prompts before the host parses extra networks,
  so the host loads and applies it itself (a prompt that already has a tag for that network keeps its own:
  the tag replaces the toggle's strength, never adds to it); hypernetworks from our folder are published in
  ``shared.hypernetworks`` so the host can find them by name;
- our path, on hosts without that: our reversible attention patch
  (:mod:`extensions_lib.hypernetworks.patch`) stays on the current model while the toggle is on; it is
  checked before every generation (a model switch from the RAM cache fires no callback) and removed when
  the toggle is turned off, the model changes, or scripts unload.

Either way the choice is written to the infotext as ``Hypernet``, ``Hypernet hash`` and ``Hypernet
strength`` (the keys the WebUI used before extra networks), which the settings declare as their infotext
keys, so pasting the parameters back restores the toggle.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import AlchemyError
from . import settings as st

log = logging.getLogger(__name__)


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


# ---- embeddings ---------------------------------------------------------------------------------------

class EmbeddingWiring:
    """Our embeddings folder inside the host's embedding database.

    embedding_db: the host's ``EmbeddingDatabase`` or None (then prompts cannot use embeddings through
    the host, and :attr:`unsupported` says so). model_loaded: whether a model is loaded now (the
    database's reload reads the model's text encoder, and must not trigger a model load).
    """

    def __init__(self, embedding_db: Any, model_loaded: Callable[[], bool]):
        self.db = embedding_db
        self._model_loaded = model_loaded

    @property
    def unsupported(self) -> str | None:
        if self.db is None or not hasattr(self.db, "embedding_dirs"):
            return "this WebUI has no embedding database (modules.sd_hijack.model_hijack.embedding_db): " \
                   "embeddings trained here cannot be used in its prompts"
        return None

    def ensure_folder(self, folder: str | os.PathLike) -> bool:
        """Make the host load embeddings from `folder` too; True when it was added now (then reloaded)."""
        if self.unsupported:
            return False
        if any(_same_path(path, folder) for path in list(self.db.embedding_dirs)):
            return False
        self.db.add_embedding_dir(str(folder))
        self.reload()
        return True

    def reload(self) -> bool:
        """Reload the host's embeddings now (after we wrote a file); False when no model is loaded yet."""
        if self.unsupported or not self._model_loaded():
            return False
        self.db.load_textual_inversion_embeddings(force_reload=True)
        return True

    def listing(self) -> list[dict]:
        """What the host loaded: usable embeddings, then skipped ones (wrong width for this model)."""
        if self.unsupported:
            return []
        out = []
        for usable, table in ((True, self.db.word_embeddings), (False, getattr(self.db, "skipped_embeddings", {}))):
            for name, emb in table.items():
                out.append({"name": name, "usable": usable, "vectors": int(getattr(emb, "vectors", 0) or 0),
                            "width": int(getattr(emb, "shape", 0) or 0), "step": getattr(emb, "step", None),
                            "file": getattr(emb, "filename", None),
                            "reason": None if usable else "its width does not match the loaded model"})
        return out


# ---- hypernetworks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Applied:
    model: int
    name: str
    strength: float
    stamp: tuple[int, int]


class HypernetworkWiring:
    """The settings toggle, applied through the host (see the module docstring) or through our patch.

    shared: the host's ``modules.shared``. library: ``() -> HypernetworkLibrary`` of our folder (refreshed on
    each call). adapter: ``() -> WebUIModelAdapter`` of the current model. host_path: whether the host has
    ``loaded_hypernetworks`` and the ``hypernet`` extra network.
    """

    def __init__(self, shared: Any, library: Callable[[], Any], adapter: Callable[[], Any], host_path: bool):
        self.shared = shared
        self._library = library
        self._adapter = adapter
        self.host_path = host_path
        self._patch = None
        self._applied: Applied | None = None
        self._hashes: dict[tuple[str, tuple[int, int]], str] = {}

    # --- listing ---------------------------------------------------------------------------------------
    def host_names(self) -> dict[str, str]:
        table = getattr(self.shared, "hypernetworks", None)
        return dict(table) if isinstance(table, dict) else {}

    def choices(self) -> list[str]:
        """Every hypernetwork the toggle can pick: the host's and our folder's."""
        names = set(self.host_names())
        try:
            names.update(self._library().names())
        except AlchemyError as exc:
            log.warning("%s", exc.message)
        return sorted(names, key=str.lower)

    def refresh(self) -> None:
        """The settings' refresh button: rescan the host's and our folders."""
        reload = getattr(self.shared, "reload_hypernetworks", None)
        if callable(reload):
            reload()
        self.publish()

    def publish(self) -> None:
        """Host path: list our folder's hypernetworks in ``shared.hypernetworks`` (the host's own names win)."""
        table = getattr(self.shared, "hypernetworks", None)
        if not self.host_path or not isinstance(table, dict):
            return
        library = self._library()
        for entry in library.entries():
            table.setdefault(entry.name, str(entry.path))

    def path(self, name: str) -> Path:
        host = self.host_names().get(name)
        if host:
            return Path(host)
        return self._library().path(name)

    def file_hash(self, path: Path) -> str:
        """The host's hypernetwork short hash: sha256 of the file, 10 hex digits (cached per file state)."""
        st_ = path.stat()
        key = (str(path), (st_.st_mtime_ns, st_.st_size))
        if key not in self._hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            self._hashes[key] = digest.hexdigest()[:10]
        return self._hashes[key]

    # --- per generation ------------------------------------------------------------------------------
    def choice(self) -> tuple[str | None, float]:
        name, strength = st.hypernetwork_choice(self.shared.opts)
        return (name, strength) if name and strength != 0 else (None, strength)

    def process(self, p: Any) -> None:
        """Before a generation: note the choice in the infotext and make sure it will be applied."""
        name, strength = self.choice()
        if name is None:
            self.undo()
            return
        try:
            path = self.path(name)
        except AlchemyError as exc:
            raise AlchemyError(f"the hypernetwork chosen in Settings > Alchemy ({name}) is not available: {exc.what}",
                               exc.path, exc.fix) from None
        params = getattr(p, "extra_generation_params", None)
        if isinstance(params, dict):
            params[st.INFOTEXT_NAME] = name
            params[st.INFOTEXT_HASH] = self.file_hash(path)
            params[st.INFOTEXT_STRENGTH] = _format_strength(strength)
        if self.host_path:
            self.publish()
        else:
            self.sync()

    def before_batch(self, prompts: list[str]) -> None:
        """Host path: add the toggle's tag to each prompt of the batch (in place), unless the prompt already
        names that hypernetwork itself."""
        name, strength = self.choice()
        if not self.host_path or name is None:
            return
        tag = f"<hypernet:{name}:{_format_strength(strength)}>"
        mine = re.compile(r"<hypernet:" + re.escape(name) + r"(:[^>]*)?>")
        for i, prompt in enumerate(prompts):
            if not mine.search(prompt):
                prompts[i] = prompt + tag

    # --- our patch -------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Our path: have exactly the toggle's hypernetwork on the current model (re-applied after a switch)."""
        from ..hypernetworks.patch import apply_hypernetworks

        name, strength = self.choice()
        if name is None:
            self.undo()
            return
        from ..hypernetworks.file import read_hypernetwork

        adapter = self._adapter()
        library = self._library()
        path = self.path(name)
        st_ = path.stat()
        wanted = Applied(id(adapter.sd_model), name, strength, (st_.st_mtime_ns, st_.st_size))
        if self._applied == wanted and self._patch is not None and self._patch.active:
            return
        self.undo()
        hn = library.load(name) if name in library.names() else read_hypernetwork(path)
        self._patch = apply_hypernetworks([(hn, strength)], adapter.attention_modules())
        self._applied = wanted

    def model_loaded(self, sd_model: Any = None) -> None:
        """A new model (or new weights): our patch moves to it at once (the host path needs nothing)."""
        self.undo()
        if not self.host_path and self.choice()[0] is not None:
            try:
                self.sync()
            except AlchemyError as exc:  # e.g. the file is gone: the next generation reports it
                log.warning("Alchemy: hypernetwork toggle not re-applied: %s", exc.message)

    def set_aside(self) -> None:
        """Before a training job uses the model: take off our patch and empty the host's
        ``shared.loaded_hypernetworks`` (the WebUI's own hypernetwork training empties it too). Otherwise
        the network the last generation loaded would act inside the training (twice over when training that
        same network), and the host would keep reusing that stale object after we rewrote its file."""
        self.undo()
        if isinstance(getattr(self.shared, "loaded_hypernetworks", None), list):
            self.shared.loaded_hypernetworks = []  # a new list: the host reads the attribute at every use

    def undo(self) -> None:
        if self._patch is not None:
            self._patch.unpatch()
        self._patch = None
        self._applied = None

    @property
    def patched(self) -> bool:
        return self._patch is not None and self._patch.active


def _format_strength(strength: float) -> str:
    return f"{strength:g}"
