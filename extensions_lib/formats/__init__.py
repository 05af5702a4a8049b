"""File formats, one module per family; each has a small read/write surface and hides the host's quirks."""
