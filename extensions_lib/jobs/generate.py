"""txt2img for the standalone app: the loaded embeddings and hypernetworks applied around ``generate``
(the same path as ``alchemy txt2img``: :mod:`extensions_lib.generation`).

Embeddings are matched in the prompt by name (the library is rescanned before every generation, so a
freshly trained file is usable at once); hypernetworks come from ``<hypernet:name:mult>`` tags and from
the hypernetwork toggle (select + strength, as the WebUI's setting). Both patches are undone after each
generation, so the model is unpatched whenever no generation runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..errors import Cancelled
from ..library_cache import LibraryCache
from ..sampling.txt2img import GenerationOptions
from .context import UIContext
from .progress import JobContext

NO_HYPERNETWORK = "None"


class Loaders:
    """The embeddings and hypernetworks folders of a context, kept scanned between generations."""

    def __init__(self, context: UIContext):
        from ..embeddings.library import EmbeddingLibrary
        from ..hypernetworks.library import HypernetworkLibrary

        self.context = context
        self._lock = threading.Lock()
        self._embeddings = LibraryCache(EmbeddingLibrary)
        self._hypernetworks = LibraryCache(HypernetworkLibrary)
        self._loader = None
        self._aesthetic = None

    @property
    def aesthetic_dir(self):
        from ..aesthetic.jobs import aesthetic_folders

        return aesthetic_folders(self.context)[0]

    def aesthetic(self):
        """(library of the aesthetic folder, a personaliser whose cache lasts between generations)."""
        from ..aesthetic.file import AestheticLibrary
        from ..aesthetic.personalise import Personaliser

        with self._lock:
            if self._aesthetic is None or self._aesthetic[0].folder != self.aesthetic_dir:
                self._aesthetic = (AestheticLibrary(self.aesthetic_dir), Personaliser())
            return self._aesthetic

    def embeddings(self):
        """The :class:`EmbeddingLibrary` of the embeddings folder (no model needed: for listings)."""
        return self._embeddings.get(self.context.embeddings_dir)

    def embedding_loader(self, adapter):
        """The :class:`EmbeddingLoader` of the embeddings folder for `adapter` (kept while the model is)."""
        from ..embeddings.loader import EmbeddingLoader

        with self._lock:
            if self._loader is None or self._loader.adapter is not adapter:
                self._loader = EmbeddingLoader(adapter, self.context.embeddings_dir)
            return self._loader

    def hypernetworks(self):
        """The :class:`HypernetworkLibrary` of the hypernetworks folder, rescanned."""
        return self._hypernetworks.get(self.context.hypernetworks_dir)


@dataclass
class GenerateRequest:
    options: GenerationOptions
    loaders: Loaders
    hypernetwork: str = NO_HYPERNETWORK
    hypernetwork_strength: float = 1.0
    aesthetic: Any = None
    """:class:`~extensions_lib.aesthetic.options.AestheticOptions` or None."""


def generate_images(request: GenerateRequest, job: JobContext) -> list:
    """Generate with every embedding named in the prompt and the chosen hypernetworks; returns PIL images
    carrying their infotext (``TI hashes`` and ``Hypernet`` entries as the WebUI writes them)."""
    from ..generation import generate_with_networks, without_tags

    toggle = [] if request.hypernetwork in ("", None, NO_HYPERNETWORK) else \
        [(request.hypernetwork, float(request.hypernetwork_strength))]
    opts, chosen = without_tags(request.options, toggle)
    job.update(message="loading the model", unit="step", total=opts.steps)
    adapter = request.loaders.context.model()
    loader = request.loaders.embedding_loader(adapter)
    hypernetworks = [(request.loaders.hypernetworks().load(name), mult) for name, mult in chosen] if chosen else []
    used = ", ".join(entry.name for entry in loader.used([opts.prompt, opts.negative])) or "none"

    def on_step(info: dict) -> None:
        if job.should_stop():
            raise Cancelled()
        job.update(step=int(info["i"]) + 1, total=opts.steps)

    job.update(message=f"sampling; embeddings used: {used}")
    images = generate_with_networks(adapter, opts, hypernetworks=hypernetworks, embeddings=loader,
                                    aesthetic=_aesthetic(request, adapter), callback=on_step,
                                    warn=lambda line: job.update(message=line))
    job.update(message=f"{len(images)} image(s); embeddings used: {used}")
    return images


def _aesthetic(request: GenerateRequest, adapter):
    """The aesthetic embedding to apply, or None (off, or no embedding chosen)."""
    options = request.aesthetic
    if options is None or not options.enabled:
        return None
    from ..aesthetic.standalone import StandaloneAesthetic

    library, personaliser = request.loaders.aesthetic()
    clip = None
    if adapter.family == "sd1":
        from ..aesthetic.clip_models import resolve_clip

        from ..aesthetic.jobs import aesthetic_folders

        clip = resolve_clip("", "sd1", aesthetic_folders(request.loaders.context)[1])
    return StandaloneAesthetic(adapter, library.load(options.embedding), options, clip_path=clip,
                               personaliser=personaliser)
