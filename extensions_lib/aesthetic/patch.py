"""The one reversible patch aesthetic gradients need: a method of the text-encoder object, wrapped.

The wrapper is set as an attribute of that one object (never of its class), so other models are not
touched, and :meth:`MethodPatches.undo` puts back exactly what was there (an instance attribute someone
else set, or nothing), after which calls run the original code again, bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

_MISSING = object()


class MethodPatches:
    """Wrapped methods of objects; ``undo()`` restores them in reverse order."""

    def __init__(self):
        self._installed: list[tuple[Any, str, Any]] = []

    def wrap(self, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        """Replace ``obj.name`` by ``make(original bound method)`` on `obj` only."""
        before = vars(obj).get(name, _MISSING)
        wrapper = make(getattr(obj, name))
        wrapper.__alchemy_aesthetic__ = True
        object.__setattr__(obj, name, wrapper)
        self._installed.append((obj, name, before))

    def owns(self, obj: Any) -> bool:
        return any(o is obj for o, _, _ in self._installed)

    @property
    def active(self) -> bool:
        return bool(self._installed)

    def undo(self) -> None:
        for obj, name, before in reversed(self._installed):
            if before is _MISSING:
                vars(obj).pop(name, None)
            else:
                object.__setattr__(obj, name, before)
        self._installed.clear()
