"""CLI commands, one module per area; each exposes ``register(subparsers)`` (see ``extensions_lib.cli``)."""
