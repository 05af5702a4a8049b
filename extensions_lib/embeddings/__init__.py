"""Textual-inversion embeddings on a loaded model: the loader and the trainer.

- ``library``: an embeddings folder as prompt words (re-scanned cheaply before each encode; unusable
  files listed with the reason).
- ``matcher``: finding embedding names in a prompt's tokens, as the WebUI does.
- ``patch``: the reversible wrapper around the text encoder's token embedding that splices vectors in.
- ``loader``: the three together, as the ``encode_fn`` generation takes.
- ``create``: a new embedding from an initialization text.
- ``options`` / ``method``: training one embedding over the trainer core.
- ``session``: the model set up for training and restored after (``train_embedding`` is the entry point),
  over the trainer core's :class:`~extensions_lib.train.setup.RunSetup`; ``token_rows`` serves the rows
  prompts use while the token-embedding matrices are out of memory.

File formats live in ``extensions_lib.formats.embedding*``.
"""
