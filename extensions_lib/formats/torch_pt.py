"""Write `.pt` files that a stock WebUI loads, whichever torch writes them; read them safely.

Since about torch 2.5 `torch.save` adds `.format_version` and `.storage_alignment` zip entries that the
WebUI's safe loader rejects ("bad file inside ..."). We let `torch.save` do the serialising into
memory, then copy only the entries the host accepts into a fresh zip, keeping each record 64-byte
aligned as torch does (so mmap loading keeps working). Before anything reaches the disk the result
is checked against the host's rules, and the file is written atomically.
"""
from __future__ import annotations

import collections
import io
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from ..atomic import write_bytes
from ..safe_pickle import safe_load
from .host_pt_rules import HOST_ZIP_NAME_RE, check_host_loadable

_ALIGNMENT = 64
_PADDING_EXTRA_ID = 0x4246  # "FB": the extra-field id torch uses for its alignment padding
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: same content, same bytes
_PLAIN = (str, int, float, bool, type(None), bytes)


def host_safe(obj: Any, where: str = "obj") -> Any:
    """A copy of `obj` made only of what the host's unpickler allows.

    Tensors become plain, detached, compact CPU tensors (a Parameter would be fine, but a slice of a
    big matrix would otherwise drag the whole matrix into the file). Containers are rebuilt, keeping an
    OrderedDict's ``_metadata`` as torch's state dicts have it; anything else is a programming error,
    reported with its position in the structure.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone(memory_format=torch.contiguous_format).as_subclass(torch.Tensor)
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, collections.OrderedDict):
        copy = collections.OrderedDict((k, host_safe(v, f"{where}[{k!r}]")) for k, v in obj.items())
        # A module's state_dict() carries `_metadata` (per-submodule versions) as an attribute; the host
        # pickles it with the dict (a BUILD opcode, no extra globals) and load_state_dict reads it back.
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            copy._metadata = host_safe(metadata, f"{where}._metadata")
        return copy
    if isinstance(obj, dict):
        return {k: host_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [host_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a WebUI-loadable .pt")


def _record_prefix(target: Path) -> str:
    # torch names the archive folder after the file; any name without '/' passes the host's check
    stem = target.name.split(".")[0] or "archive"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _aligned_zip(records: list[tuple[str, bytes]]) -> bytes:
    """A stored (uncompressed) zip with every record's data starting on a 64-byte boundary."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            data_start = out.tell() + 30 + len(name.encode()) + 4  # local header + name + extra header
            pad = -data_start % _ALIGNMENT
            info.extra = struct.pack("<HH", _PADDING_EXTRA_ID, pad) + b"Z" * pad
            zf.writestr(info, data)
    return out.getvalue()


def host_pt_bytes(obj: Any, prefix: str = "archive") -> bytes:
    """Serialise `obj` to the bytes of a torch zip file that the WebUI's safe loader accepts."""
    import torch

    buf = io.BytesIO()
    torch.save(host_safe(obj), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        records = []
        for name in zf.namelist():
            _, _, inner = name.partition("/")
            renamed = f"{prefix}/{inner}"
            if HOST_ZIP_NAME_RE.match(renamed):  # drops .format_version, .storage_alignment
                records.append((renamed, zf.read(name)))
    return _aligned_zip(records)


def save_pt(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as a `.pt` that loads in a stock WebUI v1.10.1 and in torch 2.1+; atomic."""
    target = Path(path)
    data = host_pt_bytes(obj, _record_prefix(target))
    problems = check_host_loadable(data, str(target))
    if problems:  # e.g. a dtype whose storage class the host does not know (bool, int8, complex)
        raise TypeError(f"{target}: the WebUI would refuse this file: " + "; ".join(problems))
    write_bytes(target, data)
    return target


def load_pt(path: str | os.PathLike) -> Any:
    """Read any torch file safely (allow-listed unpickling, tensors on CPU)."""
    return safe_load(path)
