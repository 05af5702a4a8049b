"""Load untrusted `.pt` / `.ckpt` / `.bin` pickles without letting them run code.

A pickle is a small program: its GLOBAL opcodes import any callable and its REDUCE opcodes call it,
so `torch.load` on a downloaded file can run `os.system`. We hand `torch.load` a pickle module whose
Unpickler resolves globals only from an allow-list (tensors, storages, dtypes, plain containers, the
numpy pieces that old checkpoints hold) and refuses everything else *before* anything is imported or
called. A few classes that training checkpoints carry but nobody needs (PyTorch Lightning's
`ModelCheckpoint` callback state) are replaced by inert placeholders instead of being imported.

`torch.load` does the zip / legacy-format / storage plumbing, so this works the same on the host's
torch 2.1 and on current torch; `map_location="cpu"` lets tensors saved on `cuda:0` load without CUDA.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import types
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


def _make_pickle_module(extra_allowed: frozenset[tuple[str, str]]) -> types.ModuleType:
    """A module object that `torch.load(pickle_module=...)` can use: Unpickler, load, loads."""
    placeholders: dict[tuple[str, str], type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            key = (module, name)
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
        raise AlchemyError("file not found", name, "check the path")
    if _weights_only_forced():
        # torch then refuses any pickle_module; its own weights-only unpickler is restrictive enough
        how: dict[str, Any] = {"weights_only": True}
    else:
        how = {"pickle_module": _make_pickle_module(_normalise_extra(extra_allowed)), "weights_only": False}
    try:
        return torch.load(source, map_location="cpu", **how)
    except ForbiddenGlobal as exc:
        raise AlchemyError(
            f"refused to load: the file asks to run '{exc.module}.{exc.name}', which a model or embedding "
            "file never needs (it may be malicious)",
            name, "delete the file, or get it as .safetensors from a source you trust") from None
    except Exception as exc:  # truncated zip, random bytes, bad pickle stream, ...
        raise AlchemyError(
            f"not a readable PyTorch file ({type(exc).__name__}: {exc})".replace("\n", " "),
            name, "the file is damaged or not a .pt/.ckpt/.bin; download or save it again") from exc
