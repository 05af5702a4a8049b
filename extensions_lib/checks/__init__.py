"""Per-image dataset checks (faces, watermarks, text) over one folder walk: a JSONL manifest of what each
image scored, and the flagged images listed or moved aside with their captions (:mod:`.scan`)."""
