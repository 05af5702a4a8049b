"""Alchemy's importable core: formats, patching, trainers, tagger and UI builders.

Nothing in this package imports WebUI modules; the WebUI glue lives in ``scripts/``.
"""

__version__ = "0.1.0"
