"""Load untrusted `.pt` / `.ckpt` / `.bin` pickles without letting them run code.

A pickle is a small program: its GLOBAL opcodes import any callable and its REDUCE opcodes call it,
so `torch.load` on a downloaded file can run `os.system`. We hand `torch.load` a pickle module whose
Unpickler resolves globals only from an allow-list (tensors, storages, dtypes, plain containers, the
numpy pieces that old checkpoints hold) and refuses everything else *before* anything is imported or
called. A few classes that training checkpoints carry but nobody needs (PyTorch Lightning's
`ModelCheckpoint` callback state) are replaced by inert placeholders instead of being imported.

`torch.load` does the zip / legacy-format / storage plumbing, so this works the same on the host's
torch 2.1 and on current torch; `map_location="cpu"` lets tensors saved on `cuda:0` load without CUDA.

Sizes inside the file are untrusted too: a small file must not make us allocate much more than it holds.
Before `torch.load` runs, a zip's entries must not inflate far beyond their compressed size; while it runs,
every storage's declared size and every size an allowed constructor is asked for (``bytearray(n)``,
``set(range(n))``, numpy arrays, ``UntypedStorage(n)``) is checked against the file's real data
(:data:`SLACK_BYTES` on top) before anything is allocated.
"""
from __future__ import annotations

import importlib
import io
import math
import os
import pickle
import types
import zipfile
from typing import IO, Any, Iterable, Union

from .errors import AlchemyError

PathOrFile = Union[str, os.PathLike, IO[bytes]]

_TORCH_STORAGES = (
    "FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "ComplexFloatStorage",
    "ComplexDoubleStorage", "UntypedStorage",
)
_TORCH_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128",
)
_NUMPY_MULTIARRAY = ("scalar", "_reconstruct")

# (module, name) pairs resolved by import: each builds data and nothing else.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("collections", "OrderedDict")]
    + [("torch._utils", n) for n in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state",
        "_rebuild_device_tensor_from_numpy")]
    + [("torch", n) for n in _TORCH_STORAGES + _TORCH_DTYPES + ("Size", "device")]
    + [("torch.nn.modules.container", "ParameterDict"), ("torch.nn.parameter", "Parameter")]
    + [("numpy.core.multiarray", n) for n in _NUMPY_MULTIARRAY]
    + [("numpy._core.multiarray", n) for n in _NUMPY_MULTIARRAY]
    + [("numpy", "dtype"), ("numpy", "ndarray")]
    + [("builtins", n) for n in ("set", "frozenset", "complex", "slice", "range", "bytearray")]
    + [("__builtin__", n) for n in ("set", "frozenset", "complex", "slice")]
)

# Classes found in training checkpoints that are useless to us: never imported, loaded as placeholders.
PLACEHOLDER_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("pytorch_lightning.callbacks", "model_checkpoint"),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
})


SLACK_BYTES = 1 << 20
"""What any file may allocate beyond the bytes it really holds (small containers, numpy scalars)."""
MAX_ZIP_INFLATION = 16
"""A compressed zip entry may inflate to at most this many times its stored size (plus SLACK_BYTES)."""


class SizeRefused(pickle.UnpicklingError):
    """The file declared a size its real data cannot back; nothing was allocated."""


class _Budget:
    """The bytes a file's contents can honestly account for; declared sizes are checked against it."""

    def __init__(self, data_bytes: int):
        self.limit = data_bytes + SLACK_BYTES
        self.storage_keys: set = set()
        self.storage_bytes = 0

    def check(self, nbytes: Any, what: str) -> None:
        if not isinstance(nbytes, int) or nbytes > self.limit:
            raise SizeRefused(f"{what} declares {nbytes} bytes, more than the file's {self.limit - SLACK_BYTES} "
                              "bytes of data can hold")

    def storage(self, key: Any, nbytes: int) -> None:
        if key in self.storage_keys:
            return
        self.check(nbytes, f"storage {key!r}")
        self.storage_keys.add(key)
        self.storage_bytes += nbytes
        self.check(self.storage_bytes, "all storages together")


def _element_size(storage_type: Any) -> int:
    import torch

    dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", torch.uint8)
    try:
        return int(torch.empty((), dtype=dtype).element_size())
    except (TypeError, RuntimeError):
        return 8


def _guarded_constructors(budget: _Budget) -> dict[tuple[str, str], Any]:
    """Allowed callables that can be asked for a size, wrapped to check it against `budget` first."""
    import numpy as np
    import torch

    def sized(value: Any, itemsize: int = 1) -> int:
        if isinstance(value, bool):
            return 0
        if isinstance(value, int):
            return value * itemsize
        if isinstance(value, range):
            return len(value) * max(itemsize, 8)
        return 0

    def make_bytearray(*args: Any) -> bytearray:
        budget.check(sized(args[0]) if args else 0, "bytearray")
        return bytearray(*args)

    def container(kind: type) -> Any:
        def make(*args: Any) -> Any:
            budget.check(sized(args[0], 8) if args else 0, kind.__name__)
            return kind(*args)
        return make

    def array_bytes(shape: Any, dtype: Any) -> int:
        dims = shape if isinstance(shape, (tuple, list)) else (shape,)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            return 0  # numpy itself refuses these
        return math.prod(dims) * np.dtype(dtype).itemsize

    def reconstruct(subtype: Any, shape: Any, dtype: Any, *rest: Any) -> Any:
        budget.check(array_bytes(shape, dtype), "numpy array")
        subtype = np.ndarray if subtype is ndarray else subtype  # the pickle names the guarded ndarray
        return _resolve("numpy._core.multiarray", "_reconstruct")(subtype, shape, dtype, *rest)

    def ndarray(shape: Any, dtype: Any = float, *rest: Any, **kwargs: Any) -> Any:
        budget.check(array_bytes(shape, dtype), "numpy array")
        return np.ndarray(shape, dtype, *rest, **kwargs)

    def make_dtype(spec: Any, *args: Any) -> Any:
        dtype = np.dtype(spec, *args)
        budget.check(dtype.itemsize, "numpy dtype")
        return dtype

    class UntypedStorageType:
        """Stands for ``torch.UntypedStorage``: what torch's loader reads (its dtype) plus a checked call."""

        dtype = torch.uint8

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            budget.check(sized(args[0]) if args else 0, "UntypedStorage")
            return torch.UntypedStorage(*args, **kwargs)

    guards: dict[tuple[str, str], Any] = {("torch", "UntypedStorage"): UntypedStorageType(),
                                          ("numpy", "ndarray"): ndarray, ("numpy", "dtype"): make_dtype}
    for module in ("builtins", "__builtin__"):
        guards[(module, "bytearray")] = make_bytearray
        guards[(module, "set")] = container(set)
        guards[(module, "frozenset")] = container(frozenset)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        guards[(module, "_reconstruct")] = reconstruct
    return guards


class InertPlaceholder:
    """Stands in for a skipped class: accepts any constructor arguments and state, does nothing."""

    pickled_global = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<skipped {self.pickled_global}>"


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle referenced a global outside the allow-list; nothing was imported or called."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"global '{module}.{name}' is forbidden")


def _encode_latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Protocol-2 pickles store bytes as `_codecs.encode(str, "latin1")`; allow exactly that use.
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise ForbiddenGlobal("_codecs", f"encode(..., {encoding!r})")
    return text.encode("latin1", errors)


def _resolve(module: str, name: str) -> Any:
    if module == "__builtin__":
        module = "builtins"
    if module == "numpy._core.multiarray":
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:  # numpy 1.x wrote numpy 2 names? fall back to the 1.x home
            module = "numpy.core.multiarray"
    return getattr(importlib.import_module(module), name)


def _make_pickle_module(extra_allowed: frozenset[tuple[str, str]], budget: _Budget | None = None) -> types.ModuleType:
    """A module object that `torch.load(pickle_module=...)` can use: Unpickler, load, loads.

    budget: the file's real data size, which declared storage and constructor sizes are checked against.
    """
    placeholders: dict[tuple[str, str], type] = {}
    budget = budget or _Budget(1 << 62)
    guards = _guarded_constructors(budget)
    set_persistent_load = pickle.Unpickler.__dict__["persistent_load"].__set__

    class RestrictedUnpickler(pickle.Unpickler):
        # torch assigns its storage loader here after construction; we check each storage's declared
        # size (the last field of torch's ('storage', type, key, location, numel[, view]) ids) before it runs.
        @property
        def persistent_load(self) -> Any:
            raise AttributeError("persistent_load")

        @persistent_load.setter
        def persistent_load(self, load_storage: Any) -> None:
            def checked(saved_id: Any) -> Any:
                if isinstance(saved_id, tuple) and len(saved_id) >= 5 and saved_id[0] in ("storage", b"storage"):
                    numel = saved_id[4]
                    budget.check(numel, f"storage {saved_id[2]!r}")
                    budget.storage(saved_id[2], numel * _element_size(saved_id[1]))
                return load_storage(saved_id)

            set_persistent_load(self, checked)

        def find_class(self, module: str, name: str) -> Any:
            key = (module, name)
            if key in guards and key not in extra_allowed:
                return guards[key]
            if key in ALLOWED_GLOBALS or key in extra_allowed:
                try:
                    return _resolve(module, name)
                except (ImportError, AttributeError):
                    raise ForbiddenGlobal(module, name) from None
            if key == ("_codecs", "encode"):
                return _encode_latin1
            if key in PLACEHOLDER_GLOBALS:
                if key not in placeholders:
                    placeholders[key] = type(name, (InertPlaceholder,), {"pickled_global": f"{module}.{name}"})
                return placeholders[key]
            raise ForbiddenGlobal(module, name)

    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return load(io.BytesIO(data), **kwargs)

    mod = types.ModuleType("alchemy_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.UnpicklingError = pickle.UnpicklingError
    mod.load = load
    mod.loads = loads
    return mod


def _display_name(source: PathOrFile) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<in-memory data>"))


def _normalise_extra(extra_allowed: Iterable[tuple[str, str] | str]) -> frozenset[tuple[str, str]]:
    pairs = set()
    for item in extra_allowed:
        if isinstance(item, str):
            module, _, name = item.rpartition(".")
            item = (module, name)
        pairs.add(tuple(item))
    return frozenset(pairs)


def real_data_bytes(source: PathOrFile) -> int:
    """The bytes the file can honestly hold once unpacked; SizeRefused for a zip whose entries would
    inflate far beyond what they store (a decompression bomb) or claim more than the file holds."""
    if isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source)
        opener: Any = lambda: open(source, "rb")  # noqa: E731
    else:
        position = source.tell()
        size = source.seek(0, io.SEEK_END) - position
        source.seek(position)
        opener = None
    fh = opener() if opener else source
    try:
        if not zipfile.is_zipfile(fh):
            return size
        with zipfile.ZipFile(fh) as archive:
            total = 0
            for info in archive.infolist():
                stored = info.compress_size if info.compress_type != zipfile.ZIP_STORED else info.file_size
                if stored > size or info.file_size > stored * MAX_ZIP_INFLATION + SLACK_BYTES:
                    raise SizeRefused(f"zip entry {info.filename!r} unpacks to {info.file_size} bytes from "
                                      f"{info.compress_size} stored in a {size}-byte file")
                total += info.file_size
            return max(size, total)
    except zipfile.BadZipFile:
        return size
    finally:
        if opener:
            fh.close()
        else:
            source.seek(position)


def _weights_only_forced() -> bool:
    return os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")


def safe_load(source: PathOrFile, *, extra_allowed: Iterable[tuple[str, str] | str] = ()) -> Any:
    """`torch.load` restricted to the allow-list; tensors come back on the CPU.

    `extra_allowed` adds trusted globals as `("module", "Name")` or `"module.Name"`. Anything else the
    file asks for raises AlchemyError naming the file and the global, before it is imported or run.
    """
    import torch

    name = _display_name(source)
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise AlchemyError("file not found" if not os.path.exists(source) else "not a regular file", name,
                           "check the path")
    try:
        data_bytes = real_data_bytes(source)
    except SizeRefused as exc:
        raise AlchemyError(f"refused to load: {exc}", name, "the file is not a genuine PyTorch file; delete it") from None
    if _weights_only_forced():
        # torch then refuses any pickle_module; its own weights-only unpickler is restrictive enough
        how: dict[str, Any] = {"weights_only": True}
    else:
        how = {"pickle_module": _make_pickle_module(_normalise_extra(extra_allowed), _Budget(data_bytes)),
               "weights_only": False}
    try:
        return torch.load(source, map_location="cpu", **how)
    except SizeRefused as exc:
        raise AlchemyError(f"refused to load: {exc}", name,
                           "the file is damaged or crafted; download or save it again") from None
    except ForbiddenGlobal as exc:
        raise AlchemyError(
            f"refused to load: the file asks to run '{exc.module}.{exc.name}', which a model or embedding "
            "file never needs (it may be malicious)",
            name, "delete the file, or get it as .safetensors from a source you trust") from None
    except Exception as exc:  # truncated zip, random bytes, bad pickle stream, ...
        raise AlchemyError(
            f"not a readable PyTorch file ({type(exc).__name__}: {exc})".replace("\n", " "),
            name, "the file is damaged or not a .pt/.ckpt/.bin; download or save it again") from exc
