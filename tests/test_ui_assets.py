"""style.css touches our elements only: the WebUI loads it into every page, beside its own styles."""
from __future__ import annotations

import re
from pathlib import Path

STYLE = Path(__file__).resolve().parents[1] / "style.css"
OURS = re.compile(r"(\.alchemy-[\w-]+|#alchemy_\w+)")


def selectors(css: str) -> list[str]:
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    return [s.strip() for block in re.findall(r"([^{}]+)\{[^{}]*\}", css) for s in block.split(",") if s.strip()]


def test_every_style_rule_is_scoped_to_our_ids_or_classes():
    found = selectors(STYLE.read_text(encoding="utf-8"))
    assert len(found) > 10
    # the leftmost part decides what a rule can reach: it must be one of ours
    unscoped = [s for s in found if not OURS.search(s.split()[0])]
    assert unscoped == []
    assert selectors("body, .alchemy-x td { color: red }") == ["body", ".alchemy-x td"]
