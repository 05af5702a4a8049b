"""The WebUI's "parameters" text: how a generated PNG remembers what made it.

Layout (``processing.create_infotext``)::

    <prompt>
    Negative prompt: <negative>          (only when there is one)
    Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: name

The WebUI's "PNG Info" tab and "Read generation parameters" parse exactly this, so keys and their order
follow the host.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

from ..atomic import atomic_path


def quote(value: Any) -> str:
    """A value as the WebUI writes it: JSON-quoted only when it holds a comma, colon or newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_number(value: float) -> str:
    """7.0 -> "7" (what the WebUI writes for a whole CFG scale), 7.5 -> "7.5"."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def infotext(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """Join prompt, negative prompt and ``key: value`` pairs (None values are left out)."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None,
             extra_text: Mapping[str, str] | None = None) -> None:
    """Write `image` atomically as PNG with the "parameters" text chunk (default: ``image.info``).

    extra_text: more text chunks, e.g. a training preview's ``Provenance.to_metadata()``.
    """
    parameters = image.info.get("parameters") if parameters is None else parameters
    pnginfo = PngImagePlugin.PngInfo()
    if parameters:
        pnginfo.add_text("parameters", parameters)
    for key, value in (extra_text or {}).items():
        pnginfo.add_text(key, str(value))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
