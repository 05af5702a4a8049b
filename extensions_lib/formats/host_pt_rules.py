"""Would a stock WebUI v1.10.1 agree to load this `.pt`? Checked by its rules, without unpickling.

The host's `modules/safe.py` runs two checks before `torch.load`: every zip entry must match a short
list of names, and the pickle may only reference a fixed set of globals. A file failing either is
reported as possibly malicious and skipped, so our writers verify their output with these rules.
The pickle is inspected opcode by opcode (`pickletools.genops`): nothing in it is imported or run.
"""
from __future__ import annotations

import io
import os
import pickletools
import re
import zipfile
from typing import Iterator

# The entry names the host accepts (`allowed_zip_names_re` in v1.10.1).
HOST_ZIP_NAME_RE = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|\.data/serialization_id|(data\.pkl))$")
HOST_DATA_PKL_RE = re.compile(r"^([^/]+)/data\.pkl$")

# Every (module, name) the host's RestrictedUnpickler.find_class resolves.
HOST_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("collections", "OrderedDict")]
    + [("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")]
    + [("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                               "ByteStorage", "float32", "BFloat16Storage")]
    + [("torch.nn.modules.container", "ParameterDict"),
       ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
       ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),
       ("pytorch_lightning.callbacks", "model_checkpoint"),
       ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
       ("__builtin__", "set")]
)

# A legacy (pre-zip) torch file is five pickles in a row; the host checks all five.
_LEGACY_PICKLE_COUNT = 5

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
_MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_UNKNOWN = object()


def pickle_globals(data: bytes, start: int = 0) -> tuple[list[tuple[str, str] | None], int]:
    """The globals one pickle stream references, and the offset just past its STOP opcode.

    `None` in the list marks a STACK_GLOBAL whose operands could not be traced to string constants.
    """
    found: list[tuple[str, str] | None] = []
    memo: dict[int, object] = {}
    pushed: list[object] = []  # last values pushed (strings or _UNKNOWN), enough to resolve STACK_GLOBAL
    stream = io.BytesIO(data)
    stream.seek(start)
    end = start
    for op, arg, pos in pickletools.genops(stream):
        name = op.name
        end = stream.tell()
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found.append((module, attr))
            pushed.append(_UNKNOWN)
        elif name == "STACK_GLOBAL":
            if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]):
                found.append((pushed[-2], pushed[-1]))
            else:
                found.append(None)
            pushed.append(_UNKNOWN)
        elif name in _STRING_OPS:
            pushed.append(arg.decode("latin1") if isinstance(arg, bytes) else arg)
        elif name in _MEMO_PUT_OPS:
            memo[arg] = pushed[-1] if pushed else _UNKNOWN
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else _UNKNOWN
        elif name in _MEMO_GET_OPS:
            pushed.append(memo.get(arg, _UNKNOWN))
        elif name not in ("PROTO", "FRAME"):
            pushed.append(_UNKNOWN)
        del pushed[:-2]
    return found, end


def _global_problems(data: bytes, where: str, count: int = 1) -> list[str]:
    problems = []
    offset = 0
    for _ in range(count):
        found, offset = pickle_globals(data, offset)
        for item in found:
            if item is None:
                problems.append(f"{where}: a pickle global that cannot be checked without running the pickle")
            elif item not in HOST_ALLOWED_GLOBALS:
                problems.append(f"{where}: global '{item[0]}/{item[1]}' is forbidden by the WebUI's safe loader")
    return problems


def _iter_zip_problems(path: str, zf: zipfile.ZipFile) -> Iterator[str]:
    names = zf.namelist()
    for name in names:
        if not HOST_ZIP_NAME_RE.match(name):
            yield f"bad file inside {path}: {name}"
    data_pkls = [n for n in names if HOST_DATA_PKL_RE.match(n)]
    if len(data_pkls) != 1:
        yield f"{path}: expected exactly one <name>/data.pkl, found {len(data_pkls)}"
        return
    yield from _global_problems(zf.read(data_pkls[0]), f"{path}:{data_pkls[0]}")


def check_host_loadable(source: str | os.PathLike | bytes, name: str | None = None) -> list[str]:
    """Reasons a stock WebUI v1.10.1 would refuse to load `source`; an empty list means it would load it.

    `source` is a path or the file's bytes (then `name` is what the messages call it).
    """
    if isinstance(source, (bytes, bytearray)):
        data, path = bytes(source), name or "<data>"
    else:
        path = os.fspath(source)
        with open(path, "rb") as fh:
            data = fh.read()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return list(_iter_zip_problems(path, zf))
    except zipfile.BadZipFile:
        pass
    try:
        return _global_problems(data, path, _LEGACY_PICKLE_COUNT)
    except Exception as exc:  # genops raises ValueError and friends on non-pickle bytes
        return [f"{path}: not a torch file the WebUI can read ({type(exc).__name__}: {exc})"]
