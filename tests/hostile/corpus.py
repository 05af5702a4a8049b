"""Hostile and odd files, generated in code: what a hostile user would drop into an embeddings, hypernetworks
or dataset folder. Each file is small on disk; several would cost hundreds of megabytes, run code or crash a
listing if read naively.

``build(folder, sentinel)`` writes them and returns one :class:`Specimen` per file. Every code-execution
payload touches `sentinel`, so "0 code executions" is checked by its absence.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

WIDTH = 8  # vector width of the embeddings (any width: no model is involved in reading)


@dataclass(frozen=True)
class Specimen:
    name: str          # file name inside its kind's folder
    kind: str          # "embedding", "hypernetwork" or "image" (training / preprocess / tagger data)
    what: str
    expect: str = "refuse"  # or "load": odd but valid, must load with its hostile part defused


# ---- pickles ---------------------------------------------------------------------------------------------

class _Call:
    """Pickles as ``func(*args)`` (a REDUCE of the global `func`)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _StorageRef:
    pass


def _torch_zip(data: object, records: dict[str, tuple[bytes | None, int]], storages: dict[int, tuple]) -> bytes:
    """A torch zip whose data.pkl pickles `data`, with storages given as persistent ids (`storages` maps
    ``id(_StorageRef)`` to the id tuple) and `records` name -> (bytes, zip compression) under ``data/``."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return storages.get(id(obj))

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(data)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue(), zipfile.ZIP_STORED)
        for name, (content, method) in records.items():
            zf.writestr(f"archive/data/{name}", content, method)
        zf.writestr("archive/version", b"3\n", zipfile.ZIP_STORED)
        zf.writestr("archive/byteorder", b"little", zipfile.ZIP_STORED)
    return out.getvalue()


def _tensor_declaring(numel: int) -> tuple[object, dict]:
    ref = _StorageRef()
    tensor = _Call(torch._utils._rebuild_tensor_v2, ref, 0, (numel,), (1,), False, collections.OrderedDict())
    return tensor, {id(ref): ("storage", torch.FloatStorage, "0", "cpu", numel)}


def _deflated_storage_bomb(numel: int) -> bytes:
    tensor, storages = _tensor_declaring(numel)
    zeros = bytes(numel * 4)
    return _torch_zip({"string_to_param": {"*": tensor}, "name": "bomb"}, {"0": (zeros, zipfile.ZIP_DEFLATED)},
                      storages)


def _declared_storage_bomb(numel: int) -> bytes:
    tensor, storages = _tensor_declaring(numel)
    return _torch_zip({"string_to_param": {"*": tensor}}, {"0": (bytes(16), zipfile.ZIP_STORED)}, storages)


def _raw_pickle(obj: object, protocol: int = 4) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def _torch_save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- embeddings and hypernetworks ------------------------------------------------------------------------

def _webui_embedding(**changes) -> dict:
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(2, WIDTH)}, "name": "x", "step": 5,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    data.update(changes)
    return data


def _hypernetwork_dict(**changes) -> dict:
    from extensions_lib.hypernetworks.file import to_file_dict
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

    torch.manual_seed(0)
    data = to_file_dict(Hypernetwork.create("h", [8], Architecture(layer_structure=[1, 2, 1])))
    data.update(changes)
    return data


def _png(width: int, height: int, mode_byte: int, rows, text: dict[str, bytes] | None = None) -> bytes:
    """A PNG written chunk by chunk, its IDAT compressed from `rows` (an iterable of raw scanlines) as it
    streams, so a huge declared image costs no memory here."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    out = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(chunk(b"tEXt", key.encode("latin-1") + b"\0" + value))
    packer = zlib.compressobj(9)
    idat = [packer.compress(row) for row in rows] + [packer.flush()]
    out += [chunk(b"IDAT", b"".join(idat)), chunk(b"IEND", b"")]
    return b"".join(out)


def _zlib_bomb_png(side: int) -> bytes:
    row = bytes(1 + side * 3)
    return _png(side, side, 2, (row for _ in range(side)))


def _json_png(text: str) -> bytes:
    import base64

    return _png(4, 4, 2, [bytes(13)] * 4, {"sd-ti-embedding": base64.b64encode(text.encode())})


def _pixel_payload_png(payload: bytes, height: int = 64) -> bytes:
    """An image laid out like the WebUI's pixel-encoded embeddings, carrying `payload` as its zlib stream."""
    from PIL import Image

    from extensions_lib.formats import embedding_image as ei

    nibbles = np.frombuffer(payload, np.uint8)
    low = ei.xor_block(ei._nibble_block(nibbles & 0x0F, height) | 0x10)
    high = ei.xor_block(ei._nibble_block(nibbles >> 4, height) | 0x10)
    middle = np.full((height, 8, 3), 128, np.uint8)
    black = np.zeros((height, 1, 3), np.uint8)
    arr = np.concatenate([low, black, middle, black, high], axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _good_image() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build(folder: str | os.PathLike, sentinel: str | os.PathLike) -> list[Specimen]:
    """Write the corpus under `folder` (one subfolder per kind); returns what was written."""
    from safetensors.torch import save as save_safetensors

    folder = Path(folder)
    touch = f"touch {os.fspath(sentinel)}"
    files: list[tuple[str, str, str, bytes]] = [
        # -- code execution (every payload touches the sentinel)
        ("embedding", "os_system.pt", "raw pickle calling os.system", _raw_pickle(_Call(os.system, touch), 2)),
        ("embedding", "eval.pt", "raw pickle calling builtins.eval",
         _raw_pickle(_Call(eval, f"__import__('os').system({touch!r})"))),
        ("embedding", "zip_system.pt", "torch zip whose data.pkl calls os.system",
         _torch_save({"string_to_param": {"*": torch.ones(1, WIDTH)}, "x": _Call(os.system, touch)})),
        ("hypernetwork", "popen.pt", "torch zip calling subprocess.Popen",
         _torch_save({**_hypernetwork_dict(), "x": _Call(__import__("subprocess").Popen, ["touch", str(sentinel)])})),
        ("hypernetwork", "getattr.pt", "raw pickle reaching os.system through __import__ and getattr",
         _raw_pickle(_Call(getattr, _Call(__import__, "os"), "system"))),
        # -- memory bombs in small files
        ("embedding", "deflated_storage.pt", "300 KB torch zip whose deflated storage inflates to 200 MB",
         _deflated_storage_bomb(50_000_000)),
        ("embedding", "declared_storage.pt", "storage declaring 400 GB, holding 16 bytes",
         _declared_storage_bomb(100_000_000_000)),
        ("embedding", "bytearray.pt", "1 KB pickle calling the allowed bytearray(300 MB)",
         _raw_pickle(_Call(bytearray, 300_000_000))),
        ("embedding", "set_range.pt", "pickle calling set(range(10**8))", _raw_pickle(_Call(set, range(10 ** 8)))),
        ("embedding", "numpy_reconstruct.pt", "pickle asking numpy for a 1 GB array",
         _raw_pickle(_Call(np.core.multiarray._reconstruct, np.ndarray, (10 ** 9,), b"b"))),
        ("embedding", "untyped_storage.pt", "pickle calling torch.UntypedStorage(10**10)",
         _raw_pickle(_Call(torch.UntypedStorage, 10 ** 10))),
        ("embedding", "pixel_bomb.png", "9000x9000 PNG (zlib bomb in its pixels, 240 MB decoded)",
         _zlib_bomb_png(9000)),
        ("embedding", "payload_bomb.png", "pixel-encoded embedding whose zlib stream inflates to 200 MB",
         _pixel_payload_png(zlib.compress(b" " * 200_000_000, 9))),
        ("embedding", "huge_text.png", "text chunk of 40 MB base64", _png(4, 4, 2, [bytes(13)] * 4,
                                                                         {"sd-ti-embedding": b"A" * 40_000_000})),
        ("hypernetwork", "width_1e12.pt", "layer_structure [1, 1e12, 1] with weights for [1, 2, 1]",
         _torch_save(_hypernetwork_dict(layer_structure=[1, 1e12, 1]))),
        ("hypernetwork", "width_100.pt", "layer_structure [1, 100, 1] with weights for [1, 2, 1]",
         _torch_save(_hypernetwork_dict(layer_structure=[1, 100, 1]))),
        ("hypernetwork", "huge_context.pt", "context width 10**9 key",
         _torch_save({**{k: v for k, v in _hypernetwork_dict().items() if not isinstance(k, int)},
                      10 ** 9: _hypernetwork_dict()[8]})),
        # -- odd values that crashed listings
        ("embedding", "step_inf.pt", "step: inf", _torch_save(_webui_embedding(step=float("inf")))),
        ("embedding", "infinity.png", "Infinity in an image's JSON",
         _json_png('{"string_to_param": {"*": {"TORCHTENSOR": [[1, 2, 3, 4, 5, 6, 7, 8]]}}, "step": Infinity}')),
        ("embedding", "sdxl_0d.safetensors", "SDXL pair of 0-d tensors",
         save_safetensors({"clip_l": torch.tensor(1.0), "clip_g": torch.tensor(2.0)})),
        ("embedding", "sdxl_0d.pt", "SDXL pair of 0-d tensors (pickle)",
         _torch_save({"clip_l": torch.tensor(1.0), "clip_g": torch.tensor(2.0)})),
        ("embedding", "ragged.png", "ragged tensor lists in JSON",
         _json_png('{"string_to_param": {"*": {"TORCHTENSOR": [[1, 2], [3]]}}}')),
        ("embedding", "strings.png", "tensor of strings in JSON",
         _json_png('{"string_to_param": {"*": {"TORCHTENSOR": [["a", "b"]]}}, "name": {"x": 1}}')),
        ("embedding", "escape_name.png", "name '../../x' inside the image's JSON",
         _json_png(json.dumps({"string_to_param": {"*": {"TORCHTENSOR": [[1.0] * WIDTH]}}, "name": "../../x"}))),
        ("embedding", "nan.pt", "NaN vectors", _torch_save(_webui_embedding(string_to_param={"*": torch.full((1, 8), float("nan"))}))),
        ("embedding", "3d.pt", "a 3-d tensor", _torch_save({"emb": torch.ones(2, 2, 2)})),
        ("embedding", "list_param.pt", "string_to_param holding a list", _torch_save(_webui_embedding(string_to_param=[1]))),
        ("embedding", "random.pt", "random bytes", np.random.default_rng(1).bytes(4096)),
        ("embedding", "truncated.pt", "a torch zip cut in half", _torch_save(_webui_embedding())[:600]),
        ("embedding", "lying_safetensors.safetensors", "safetensors header pointing past the end",
         struct.pack("<Q", 60) + b'{"emb_params":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]}}'[:60]),
        ("embedding", "hypernetwork_here.pt", "a hypernetwork in the embeddings folder", _torch_save(_hypernetwork_dict())),
        ("hypernetwork", "embedding_here.pt", "an embedding in the hypernetworks folder", _torch_save(_webui_embedding())),
        ("hypernetwork", "string_structure.pt", "layer_structure a string", _torch_save(_hypernetwork_dict(layer_structure="1,2,1"))),
        ("hypernetwork", "negative_width.pt", "context width -8", _torch_save({**_hypernetwork_dict(), -8: _hypernetwork_dict()[8]})),
        ("hypernetwork", "random.pt", "random bytes", np.random.default_rng(2).bytes(4096)),
        # -- data images
        ("image", "declared_huge.png", "PNG header declaring 100000 x 100000 pixels",
         _png(100_000, 100_000, 2, [bytes(10)])),
        ("image", "truncated.png", "PNG cut short", _good_image()[:300]),
        ("image", "random.png", "random bytes named .png", np.random.default_rng(3).bytes(2048)),
        ("image", "empty.png", "empty file", b""),
        ("image", "text.jpg", "a text file named .jpg", b"hello\n" * 10),
        ("image", os.fsdecode(b"non-utf8-\xff\xfe.png"), "a valid image with a non-UTF-8 name", _good_image()),
    ]
    loads = {"escape_name.png", "step_inf.pt", "infinity.png", files[-1][1]}  # read with the odd value dropped
    specimens = []
    for kind, name, what, data in files:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        (folder / kind / name).write_bytes(data)
        specimens.append(Specimen(name, kind, what, "load" if name in loads else "refuse"))
    images = folder / "image"
    os.mkfifo(images / "fifo.png")
    os.symlink("/dev/zero", images / "dev_zero.png")
    specimens += [Specimen("fifo.png", "image", "a FIFO named .png (a read would block forever)"),
                  Specimen("dev_zero.png", "image", "a link to /dev/zero named .png (a read never ends)")]
    os.mkfifo(folder / "embedding" / "fifo.pt")
    specimens.append(Specimen("fifo.pt", "embedding", "a FIFO named .pt"))
    return specimens


good_image = _good_image
