"""Fuzz the embedding and hypernetwork readers (seeded, so every run tries the same files): random truncation,
random byte flips and random field types/values. Whatever a file holds, reading it either works or raises
AlchemyError, and a folder full of such files still lists (each bad file skipped with its reason) and still
generates."""
from __future__ import annotations

import io
import random

import pytest
import torch

from extensions_lib.embeddings.library import EmbeddingLibrary
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import Embedding, read_embedding, write_embedding
from extensions_lib.hypernetworks.file import read_hypernetwork, to_file_dict
from extensions_lib.hypernetworks.library import HypernetworkLibrary
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

SEED = 1717
WIDTH = 32  # the tiny SD1 model's token width


def _values(rng: random.Random):
    pool = [float("inf"), float("-inf"), float("nan"), -1, 0, 10 ** 30, "text", "../../x", "", None, [], {}, True,
            [1, 2.5], [1, 10 ** 12, 1], {"a": 1, "b": 2}, b"bytes", torch.tensor(1.0), torch.ones(2, 2, 2),
            torch.zeros(0, WIDTH), torch.ones(1, WIDTH, dtype=torch.float16), torch.ones(1, WIDTH, dtype=torch.int64),
            torch.full((1, WIDTH), float("nan")), torch.ones(1, 7), torch.ones(80, WIDTH), {"*": torch.ones(1, WIDTH)},
            {"*": "x"}, {"*": torch.ones(1, WIDTH), "+": torch.ones(1, WIDTH)}, (1, 2)]
    return pool[rng.randrange(len(pool))]


def _json_values(rng: random.Random):
    pool = ["Infinity", "-Infinity", "NaN", "-1", "1e400", '"text"', '"../x"', "null", "[]", "{}", "true",
            '{"TORCHTENSOR": [[1, 2], [3]]}', '{"TORCHTENSOR": [["a"]]}', '{"TORCHTENSOR": 5}',
            '{"TORCHTENSOR": [[Infinity, NaN]]}', '{"TORCHTENSOR": []}', '{"*": {"TORCHTENSOR": [[1.0, 2.0]]}}',
            '{"*": 3}', '[1, 2]']
    return pool[rng.randrange(len(pool))]


def _base_embedding_files() -> dict[str, bytes]:
    import tempfile
    from pathlib import Path

    vectors = torch.linspace(-1, 1, 2 * WIDTH).reshape(2, WIDTH)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a.pt", "a.safetensors", "a.png", "a.webp"):
            path = Path(tmp) / name
            write_embedding(Embedding(name="a", vectors=vectors, step=3), path)
            out[name] = path.read_bytes()
        sdxl = Path(tmp) / "x.safetensors"
        write_embedding(Embedding(name="x", vectors={"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}),
                        sdxl)
        out["sdxl.safetensors"] = sdxl.read_bytes()
    return out


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _png_with_text(text: str) -> bytes:
    import base64

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(text.encode()))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _mutated(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return data[:rng.randrange(len(data))]
    mutable = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        mutable[rng.randrange(len(mutable))] = rng.randrange(256)
    return bytes(mutable)


def embedding_corpus(folder) -> list[str]:
    rng = random.Random(SEED)
    files: dict[str, bytes] = {}
    for base_name, data in _base_embedding_files().items():
        files[f"ok_{base_name}"] = data
        for i in range(12):
            stem, suffix = base_name.rsplit(".", 1)
            files[f"cut{i}_{stem}.{suffix}"] = _mutated(data, rng)
    keys = ["string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name", "string_to_token", "clip_l",
            "clip_g", "alchemy"]
    for i in range(40):
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(1, WIDTH)}, "name": "f",
                "step": 1}
        for key in rng.sample(keys, rng.randint(1, 3)):
            data[key] = _values(rng)
        files[f"field{i}.pt"] = _torch_bytes(data)
    for i in range(30):
        fields = {"string_to_param": '{"*": {"TORCHTENSOR": [[' + ", ".join(["0.5"] * WIDTH) + ']]}}',
                  "name": '"j"', "step": "2"}
        for key in rng.sample(["string_to_param", "name", "step", "sd_checkpoint"], rng.randint(1, 2)):
            fields[key] = _json_values(rng)
        files[f"json{i}.png"] = _png_with_text("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def hypernetwork_corpus(folder) -> list[str]:
    rng = random.Random(SEED + 1)
    torch.manual_seed(0)
    base = to_file_dict(Hypernetwork.create("h", [WIDTH], Architecture(layer_structure=[1, 2, 1])))
    files = {"ok.pt": _torch_bytes(base)}
    for i in range(12):
        files[f"cut{i}.pt"] = _mutated(files["ok.pt"], rng)
    keys = ["layer_structure", "activation_func", "is_layer_norm", "dropout_structure", "use_dropout", "step", "name",
            "weight_initialization", "activate_output", "last_layer_dropout", "optional_info", WIDTH, 8]
    for i in range(40):
        data = dict(base)
        for key in rng.sample(keys, rng.randint(1, 3)):
            data[key] = _values(rng)
        files[f"field{i}.pt"] = _torch_bytes(data)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def test_embedding_readers_never_raise_anything_but_alchemy_errors(tmp_path):
    names = embedding_corpus(tmp_path)
    outcomes = {"read": 0, "refused": 0}
    for name in names:
        try:
            read_embedding(tmp_path / name)
            outcomes["read"] += 1
        except AlchemyError as exc:
            assert exc.what and str(tmp_path / name) in str(exc)
            outcomes["refused"] += 1
    assert outcomes["read"] >= 10 and outcomes["refused"] >= 50, outcomes  # the corpus exercises both


@pytest.mark.parametrize("widths", [None, {"": WIDTH}, {"clip_l": 768, "clip_g": 1280}], ids=["none", "sd1", "sdxl"])
def test_a_folder_of_fuzzed_embeddings_lists_every_file_with_a_reason(tmp_path, widths):
    names = embedding_corpus(tmp_path)
    library = EmbeddingLibrary(tmp_path, widths)
    entries = library.entries()
    assert sorted(e.path.name for e in entries) == names
    assert all(e.usable or (isinstance(e.error, str) and e.error) for e in entries)
    assert all(e.describe() for e in entries)
    assert library.names()  # the good files are still usable
    if widths == {"": WIDTH}:
        assert "a" in library.names() or "f" in library.names()


def test_generation_goes_on_beside_fuzzed_embeddings(tiny_model, tmp_path):
    from extensions_lib.embeddings.loader import EmbeddingLoader

    adapter = tiny_model("sd1")
    assert adapter.text_encoders[0].width == WIDTH
    embedding_corpus(tmp_path)
    with EmbeddingLoader(adapter, tmp_path) as loader:
        usable = loader.library.names()
        assert usable and loader.library.skipped
        cond = loader.encode(adapter, ["a photo of " + " ".join(usable[:10])])
    assert torch.isfinite(cond).all()


def test_hypernetwork_readers_and_listing_survive_fuzzed_files(tmp_path):
    names = hypernetwork_corpus(tmp_path)
    refused = 0
    for name in names:
        try:
            read_hypernetwork(tmp_path / name)
        except AlchemyError as exc:
            assert exc.what
            refused += 1
    assert refused >= 20
    library = HypernetworkLibrary(tmp_path)
    listed = {e.path.name for e in library.entries()} | {e.path.name for e in library.skipped}
    assert listed == set(names)
    assert all(e.error for e in library.skipped) and "ok" in library.names()
