"""What every trained file records about where it came from.

A :class:`Provenance` is built once per run from the model adapter and the dataset, and the format
writers embed it where their format allows (a .pt dict's extra keys, safetensors metadata, PNG text).
"""
from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field

from .. import __version__


@dataclass(frozen=True)
class Provenance:
    base_model_name: str
    """File stem of the checkpoint trained on (the WebUI's ``sd_checkpoint_name``)."""
    base_model_hash: str
    """Its short hash, sha256[:10] (the WebUI's ``sd_checkpoint``); "" when unknown."""
    dataset_images: int
    dataset_hash: str
    """sha256 over the images' names, bytes and captions (see ``ImageDataset.content_hash``)."""
    source_note: str = ""
    """The user's note on where the images come from / permission to use them."""
    method: str = ""
    precision: str = ""
    """How the frozen model computed when not in its loaded dtype (low-memory training, e.g. "weights
    bfloat16, compute bfloat16"); "" otherwise."""
    trainer: str = field(default=f"alchemy {__version__}")
    created: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (also picklable with only builtin types, for WebUI .pt files)."""
        return asdict(self)

    def to_metadata(self, prefix: str = "alchemy_") -> dict[str, str]:
        """Flat string dict, e.g. for safetensors metadata; keys get `prefix`."""
        return {prefix + k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Provenance":
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)


def collect(adapter, dataset, *, source_note: str = "", method: str = "") -> Provenance:
    """Provenance of a run on `adapter`'s checkpoint with `dataset` (anything with ``len`` and
    ``content_hash``, e.g. an :class:`~extensions_lib.train.dataset.ImageDataset`)."""
    return Provenance(base_model_name=getattr(adapter, "checkpoint_name", "") or "",
                      base_model_hash=getattr(adapter, "checkpoint_hash", "") or "",
                      dataset_images=len(dataset), dataset_hash=dataset.content_hash,
                      source_note=source_note, method=method)
