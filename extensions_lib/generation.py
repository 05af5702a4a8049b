"""One generation path for ``alchemy txt2img`` and the app's txt2img job: the chosen hypernetworks and an
embeddings folder applied around :func:`~extensions_lib.sampling.txt2img.generate_from`, with the
infotext built the same way for both.

Hypernetworks come from the prompt's ``<hypernet:NAME:MULT>`` tags, then from the extra ones asked for
(``--hypernetwork``, the app's toggle) whose name no tag names, as the WebUI's hypernetwork setting adds
its tag. Both patches are undone after the generation.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Sequence

from .sampling.txt2img import GenerationOptions, generate_from


def choose_hypernetworks(prompt: str, extra: Sequence[tuple[str, float]] = ()) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its hypernetwork tags, [(name, multiplier), ...] in the order they chain)."""
    from .hypernetworks.prompt import parse_hypernet_tags

    prompt, wanted = parse_hypernet_tags(prompt)
    named = {name for name, _ in wanted}
    return prompt, wanted + [(name, float(mult)) for name, mult in extra if name not in named]


def hypernetwork_infotext(chosen: Sequence[tuple[object, float]]) -> dict[str, str]:
    """Infotext entries of (Hypernetwork, multiplier) pairs: names and, when any is not 1, the strengths."""
    if not chosen:
        return {}
    params = {"Hypernet": ", ".join(hn.name for hn, _ in chosen)}
    if any(mult != 1 for _, mult in chosen):
        params["Hypernet strength"] = ", ".join(f"{mult:g}" for _, mult in chosen)
    return params


@contextlib.contextmanager
def _hypernetworks_applied(adapter, chosen, warn: Callable[[str], None]):
    if not chosen:
        yield
        return
    from .hypernetworks.patch import apply_hypernetworks

    with apply_hypernetworks(list(chosen), adapter.attention_modules()) as patch:
        if patch.unused:
            warn(patch.summary())
        yield


def generate_with_networks(adapter, opts: GenerationOptions, *, hypernetworks: Sequence[tuple[object, float]] = (),
                           embeddings=None, aesthetic=None, callback: Callable[[dict], None] | None = None,
                           warn: Callable[[str], None] = lambda line: None, refuse_nan: bool = False) -> list:
    """Generate `opts` (its prompt without hypernetwork tags: :func:`choose_hypernetworks`) with the
    (Hypernetwork, multiplier) pairs chained into the attention and an
    :class:`~extensions_lib.embeddings.loader.EmbeddingLoader` (or None) on the text encoder; PIL images
    whose infotext carries the ``Hypernet`` and ``TI hashes`` entries as the WebUI writes them. `aesthetic`:
    an aesthetic embedding to apply (:class:`~extensions_lib.aesthetic.standalone.StandaloneAesthetic`) or None.
    `refuse_nan`: :func:`~extensions_lib.sampling.txt2img.generate_from`'s.
    """
    extra = hypernetwork_infotext(hypernetworks)
    with _hypernetworks_applied(adapter, hypernetworks, warn), embeddings or contextlib.nullcontext(), \
            aesthetic or contextlib.nullcontext():
        if embeddings is not None:
            extra.update(embeddings.infotext_params([opts.prompt, opts.negative]))
        encode_fn = embeddings.encode if embeddings is not None else None
        if aesthetic is not None:
            encode_fn = aesthetic.encode_fn(encode_fn, opts.negative)
            extra.update(aesthetic.infotext())
        return generate_from(adapter, opts, callback=callback, extra_params=extra, encode_fn=encode_fn,
                             refuse_nan=refuse_nan)


def without_tags(opts: GenerationOptions, extra: Sequence[tuple[str, float]] = ()):
    """(`opts` with the prompt's hypernetwork tags taken out, the (name, multiplier) pairs chosen)."""
    prompt, chosen = choose_hypernetworks(opts.prompt, extra)
    return replace(opts, prompt=prompt), chosen
