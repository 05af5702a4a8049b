"""Create a new hypernetwork file from the Create options (the host's ``create_hypernetwork``)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import AlchemyError
from .file import write_hypernetwork
from .module import Hypernetwork
from .options import CreateHypernetworkOptions, architecture, sanitize_name


def new_hypernetwork(opts: CreateHypernetworkOptions) -> Hypernetwork:
    """A freshly initialised hypernetwork (step 0, no checkpoint) as the options describe."""
    if not opts.sizes:
        raise AlchemyError("no module sizes selected", fix="pick at least one of 768, 1024, 320, 640, 1280")
    return Hypernetwork.create(sanitize_name(opts.name), [int(s) for s in opts.sizes], architecture(opts),
                               weight_init=opts.weight_init, use_dropout=opts.use_dropout)


def create_hypernetwork(opts: CreateHypernetworkOptions, directory: str | os.PathLike) -> Path:
    """Write ``<directory>/<name>.pt``; an existing file is kept unless `opts.overwrite`."""
    hn = new_hypernetwork(opts)
    path = Path(directory) / f"{hn.name}.pt"
    if path.exists() and not opts.overwrite:
        raise AlchemyError("a hypernetwork with this name already exists", path,
                           "choose another name or turn on Overwrite Old Hypernetwork")
    write_hypernetwork(hn, path)
    return path
