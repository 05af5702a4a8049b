"""txt2img for the standalone app: the loaded embeddings and hypernetworks applied around ``generate``.

Embeddings are matched in the prompt by name (the library is rescanned before every generation, so a
freshly trained file is usable at once); hypernetworks come from ``<hypernet:name:mult>`` tags and from
the hypernetwork toggle (select + strength, as the WebUI's setting). Both patches are undone after each
generation, so the model is unpatched whenever no generation runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

from ..errors import Cancelled
from ..sampling.txt2img import GenerationOptions, generate_from
from .context import UIContext
from .progress import JobContext

NO_HYPERNETWORK = "None"


class Loaders:
    """The embeddings and hypernetworks folders of a context, kept scanned between generations."""

    def __init__(self, context: UIContext):
        self.context = context
        self._lock = threading.Lock()
        self._embeddings = None
        self._loader = None
        self._hypernetworks = None

    def embeddings(self):
        """The :class:`EmbeddingLibrary` of the embeddings folder (no model needed: for listings)."""
        from ..embeddings.library import EmbeddingLibrary

        with self._lock:
            if self._embeddings is None:
                self._embeddings = EmbeddingLibrary(self.context.embeddings_dir)
            else:
                self._embeddings.refresh()
            return self._embeddings

    def embedding_loader(self, adapter):
        """The :class:`EmbeddingLoader` of the embeddings folder for `adapter` (kept while the model is)."""
        from ..embeddings.loader import EmbeddingLoader

        with self._lock:
            if self._loader is None or self._loader.adapter is not adapter:
                self._loader = EmbeddingLoader(adapter, self.context.embeddings_dir)
            return self._loader

    def hypernetworks(self):
        """The :class:`HypernetworkLibrary` of the hypernetworks folder, rescanned."""
        from ..hypernetworks.library import HypernetworkLibrary

        with self._lock:
            if self._hypernetworks is None:
                self._hypernetworks = HypernetworkLibrary(self.context.hypernetworks_dir)
            else:
                self._hypernetworks.refresh()
            return self._hypernetworks


@dataclass
class GenerateRequest:
    options: GenerationOptions
    loaders: Loaders
    hypernetwork: str = NO_HYPERNETWORK
    hypernetwork_strength: float = 1.0


def _encode_without_tags(adapter, prompts, clip_skip: int = 1, *, loader):
    """Encode prompts with their ``<hypernet:...>`` tags taken out (they select networks, not words)."""
    from ..hypernetworks.prompt import parse_hypernet_tags

    return loader.encode(adapter, [parse_hypernet_tags(p)[0] for p in prompts], clip_skip)


def generate_images(request: GenerateRequest, job: JobContext) -> list:
    """Generate with every embedding named in the prompt and the chosen hypernetworks; returns PIL images
    carrying their infotext (``TI hashes`` and ``Hypernet`` entries as the WebUI writes them)."""
    from ..hypernetworks.patch import apply_hypernetworks
    from ..hypernetworks.prompt import parse_hypernet_tags

    opts = request.options
    job.update(message="loading the model", unit="step", total=opts.steps)
    adapter = request.loaders.context.model()
    loader = request.loaders.embedding_loader(adapter)

    prompt, chosen = parse_hypernet_tags(opts.prompt)
    extra: dict = {}
    if request.hypernetwork and request.hypernetwork != NO_HYPERNETWORK:
        chosen.insert(0, (request.hypernetwork, float(request.hypernetwork_strength)))
        extra["Hypernet"] = request.hypernetwork
        extra["Hypernet strength"] = request.hypernetwork_strength if request.hypernetwork_strength != 1 else None
    hypernetworks = [(request.loaders.hypernetworks().load(name), mult) for name, mult in chosen] if chosen else []
    used = [entry.name for entry in loader.used([prompt, opts.negative])]
    extra.update(loader.infotext_params([prompt, opts.negative]))

    def on_step(info: dict) -> None:
        if job.should_stop():
            raise Cancelled()
        job.update(step=int(info["i"]) + 1, total=opts.steps)

    job.update(message=f"sampling; embeddings used: {', '.join(used) or 'none'}")
    with loader, apply_hypernetworks(hypernetworks, adapter.attention_modules()):
        images = generate_from(adapter, opts, encode_fn=partial(_encode_without_tags, loader=loader),
                               callback=on_step, extra_params=extra)
    job.update(message=f"{len(images)} image(s); embeddings used: {', '.join(used) or 'none'}")
    return images
