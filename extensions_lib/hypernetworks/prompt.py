"""The ``<hypernet:name:multiplier>`` prompt syntax (the WebUI's "hypernet" extra network)."""
from __future__ import annotations

import math
import re

from ..errors import AlchemyError

# The host's extra-network tag: "<" type ":" arguments ">" with arguments split on ":".
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")

DEFAULT_MULTIPLIER = 1.0
"""What the host uses when a tag gives no multiplier."""


def parse_hypernet_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Split `prompt` into (prompt without its hypernet tags, [(name, multiplier), ...] in order).

    Only ``hypernet`` tags are taken out; other extra-network tags (``<lora:...>``) stay for their own
    handlers. As in the host the tag is removed without touching the text around it, the name is the
    first argument verbatim and the multiplier the second (default 1.0); further arguments are ignored.
    """
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        if match.group(1) != "hypernet":
            return match.group(0)
        items = match.group(2).split(":")
        name = items[0]
        if not name:
            raise AlchemyError(f"prompt tag {match.group(0)} has no hypernetwork name", fix="write <hypernet:NAME:0.8>")
        multiplier = DEFAULT_MULTIPLIER
        if len(items) > 1:
            try:
                multiplier = float(items[1])
                if not math.isfinite(multiplier):
                    raise ValueError(items[1])
            except ValueError:
                raise AlchemyError(f"prompt tag {match.group(0)}: multiplier {items[1]!r} is not a number",
                                   fix="write <hypernet:NAME:0.8>") from None
        found.append((name, multiplier))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, prompt), found


def with_toggle(tags: list[tuple[str, float]], toggled: str | None, strength: float) -> tuple[list[tuple[str, float]], bool]:
    """The networks to apply: the prompt's tags, plus the settings toggle's network unless a tag names it.

    A tag for the toggled network replaces the toggle's strength (it is never applied twice); returns
    (networks, whether the toggle itself was used).
    """
    if not toggled or any(name == toggled for name, _ in tags):
        return list(tags), False
    return [(toggled, strength), *tags], True
