"""A folder's library (embeddings, hypernetworks) made on first use and refreshed on each later one.

Libraries reread only the files that changed, so keeping one per folder and refreshing it is cheap; a
lock, because gradio and the HTTP API call in from several threads.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

L = TypeVar("L")


class LibraryCache(Generic[L]):
    """``get(folder)``: the library of `folder` (``make(folder)`` the first time, ``refresh()``-ed after)."""

    def __init__(self, make: Callable[[Path], L]):
        self.make = make
        self._lock = threading.Lock()
        self._libraries: dict[Path, L] = {}

    def get(self, folder: str | os.PathLike) -> L:
        folder = Path(folder)
        with self._lock:
            library = self._libraries.get(folder)
            if library is None:
                library = self._libraries[folder] = self.make(folder)
            else:
                library.refresh()
            return library
