"""Training methods: :mod:`.registry` is where each one declares itself (read its docstring to add one)."""
from .registry import MethodSpec, find, methods

__all__ = ["MethodSpec", "find", "methods"]
