"""Option dataclasses rendered as gradio components, grouped under their declared headings.

Components come from :func:`extensions_lib.options.gradio_components` (the one renderer); this module
only chooses *which* options go where (a tab may place some of them itself, e.g. a name beside a
dropdown) and collects the values back through :func:`extensions_lib.options.from_ui_values`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..options import from_ui_values, gradio_components, specs


@dataclass
class OptionForm:
    """Rendered options of one class: ``inputs`` go to an event, ``read(*values)`` gives the instance back."""

    cls: type
    components: dict[str, Any]
    base: Any = None

    @property
    def names(self) -> list[str]:
        return list(self.components)

    @property
    def inputs(self) -> list[Any]:
        return list(self.components.values())

    def read(self, values: Sequence[Any], base: Any = None, extra: dict[str, Any] | None = None):
        """The options instance from component values given in ``inputs`` order, plus `extra` values of
        options the tab placed itself; options not rendered keep `base`'s (or the form's defaults')."""
        extra = extra or {}
        return from_ui_values(self.cls, [*extra, *self.names], [*extra.values(), *values],
                              base if base is not None else self.base)


def ui_groups(cls, skip: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
    """[(heading, [option names])] of the UI options of `cls`, headings in order of first appearance."""
    skip = set(skip)
    groups: dict[str, list[str]] = {}
    for spec in specs(cls):
        if spec.ui and spec.name not in skip:
            groups.setdefault(spec.group, []).append(spec.name)
    return list(groups.items())


def render_options(cls, defaults: Any = None, *, elem_prefix: str, only: Iterable[str] | None = None,
                   skip: Iterable[str] = (), accordions: bool = True, open_groups: Iterable[str] | str = "all"
                   ) -> OptionForm:
    """Render the UI options of `cls` (all, or `only`, minus `skip`) inside the current gradio Blocks.

    Options with a group heading are put in a ``gr.Accordion`` per heading (open when listed in
    `open_groups`, or all when "all"); ungrouped ones come first, without a heading. Element ids are
    ``<elem_prefix>_<option name>``.
    """
    import gradio as gr

    base = defaults if defaults is not None else cls()
    keep = None if only is None else set(only)
    components: dict[str, Any] = {}
    for heading, names in ui_groups(cls, skip):
        names = [n for n in names if keep is None or n in keep]
        if not names:
            continue
        if heading and accordions:
            opened = open_groups == "all" or heading in open_groups
            with gr.Accordion(heading, open=opened, elem_id=f"{elem_prefix}_group_{_slug(heading)}"):
                components.update(gradio_components(cls, base, elem_prefix=elem_prefix, only=names))
        else:
            components.update(gradio_components(cls, base, elem_prefix=elem_prefix, only=names))
    return OptionForm(cls, components, base)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
