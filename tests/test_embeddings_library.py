"""The embeddings folder: names from files, picked up without restart, unusable files listed with reasons,
and the loader that txt2img uses."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from extensions_lib.embeddings.library import EmbeddingLibrary, fit_problem
from extensions_lib.embeddings.loader import EmbeddingLoader
from extensions_lib.embeddings.matcher import EmbeddingMatcher
from extensions_lib.embeddings.patch import patch_text_encoders
from extensions_lib.formats.embedding import Embedding, write_embedding
from extensions_lib.prompt import encode_prompts

WIDTH = 32  # the tiny models' text width


def vec(count: int = 2, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def put(path: Path, vectors, name: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":  # the diffusers form: {token: tensor}
        torch.save({"<tok>": vectors}, path)
        return path
    return write_embedding(Embedding(name or path.stem, vectors, step=1), path)


def sdxl_vectors() -> dict:
    return {"clip_l": vec(2, 768), "clip_g": vec(2, 1280, seed=1)}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def evil_pt(path: Path) -> Path:
    """A torch zip file whose pickle calls os.system when unpickled without restrictions."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"string_to_param": {"*": Evil()}}, protocol=2))
        zf.writestr("archive/version", "3\n")
    return path


def test_files_become_names_recursively_and_bad_ones_are_listed_with_reasons(tmp_path):
    put(tmp_path / "alpha.pt", vec())
    put(tmp_path / "sub" / "deeper" / "beta.safetensors", vec(3, seed=2))
    put(tmp_path / "sub" / "gamma.bin", vec(1, seed=3))
    put(tmp_path / "img" / "delta.png", vec(4, seed=4))
    put(tmp_path / "wide.pt", vec(2, 48))
    put(tmp_path / "xl.safetensors", sdxl_vectors())
    put(tmp_path / "huge.pt", vec(76))
    put(tmp_path / "nan.pt", torch.full((1, WIDTH), float("nan")))
    evil_pt(tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    (tmp_path / "empty.pt").write_bytes(b"")
    full = put(tmp_path / "cut.safetensors", vec())
    full.write_bytes(full.read_bytes()[:-7])
    put(tmp_path / "skipme.preview.png", vec())      # previews are never embeddings (host rule)
    (tmp_path / "notes.txt").write_text("not an embedding")

    library = EmbeddingLibrary(tmp_path, {"": WIDTH})
    assert library.names() == ["alpha", "beta", "delta", "gamma"]
    assert torch.equal(library.get("beta").vectors, vec(3, seed=2))
    assert library.get("gamma").num_vectors == 1 and library.get("delta").num_vectors == 4
    reasons = {e.path.name: e.error for e in library.skipped}
    assert set(reasons) == {"wide.pt", "xl.safetensors", "huge.pt", "nan.pt", "evil.pt", "garbage.pt", "empty.pt",
                            "cut.safetensors"}
    assert "48 wide" in reasons["wide.pt"] and "takes 32" in reasons["wide.pt"]
    assert "SDXL" in reasons["xl.safetensors"]
    assert "76 vectors" in reasons["huge.pt"]
    assert "NaN" in reasons["nan.pt"]
    assert "system" in reasons["evil.pt"]            # the forbidden global is named, nothing ran
    assert reasons["empty.pt"] == "empty file"
    for name in ("garbage.pt", "cut.safetensors"):
        assert reasons[name]
    # Without a model every readable file is listed, SDXL ones included.
    unbound = EmbeddingLibrary(tmp_path)
    assert {"wide", "xl"} <= set(unbound.names()) and "huge" not in unbound.names()
    assert {e.name: e.kind for e in unbound.entries()}["xl"] == "SDXL"


def test_sdxl_model_takes_only_matching_pairs():
    widths = {"clip_l": 768, "clip_g": 1280}
    assert fit_problem(Embedding("x", sdxl_vectors()), widths) is None
    assert "needs clip_g and clip_l" in fit_problem(Embedding("x", vec(2, 768)), widths)
    bad = {"clip_l": vec(2, 768), "clip_g": vec(2, 1024)}
    assert "clip_g vectors are 1024 wide" in fit_problem(Embedding("x", bad), widths)


def test_unusable_embedding_is_named_with_its_reason_when_asked_for(tmp_path):
    from extensions_lib.errors import AlchemyError

    put(tmp_path / "wide.pt", vec(2, 48))
    library = EmbeddingLibrary(tmp_path, {"": WIDTH})
    with pytest.raises(AlchemyError, match="48 wide") as info:
        library.get("wide")
    assert info.value.path == str(tmp_path / "wide.pt")
    with pytest.raises(AlchemyError, match="no embedding named 'nothing'"):
        library.get("nothing")


def test_same_name_twice_keeps_the_later_file_and_lists_the_other(tmp_path):
    put(tmp_path / "a" / "twin.pt", vec(seed=1))
    put(tmp_path / "b" / "twin.pt", vec(seed=2))
    library = EmbeddingLibrary(tmp_path, {"": WIDTH})
    assert torch.equal(library.get("twin").vectors, vec(seed=2))
    (skipped,) = library.skipped
    assert skipped.path == tmp_path / "a" / "twin.pt" and "same name" in skipped.error


def test_refresh_sees_added_changed_and_removed_files_and_rereads_only_those(tmp_path):
    put(tmp_path / "keep.pt", vec(seed=1))
    put(tmp_path / "change.pt", vec(seed=2))
    library = EmbeddingLibrary(tmp_path, {"": WIDTH})
    kept = library.get("keep")
    assert library.refresh() is False and library.get("keep") is kept

    put(tmp_path / "sub" / "new.pt", vec(seed=3))
    put(tmp_path / "change.pt", vec(seed=4))
    (tmp_path / "gone.pt").write_bytes(b"")
    assert library.refresh() is True
    assert library.names() == ["change", "keep", "new"]
    assert torch.equal(library.get("change").vectors, vec(seed=4))
    assert library.get("keep") is kept  # unchanged file: not read again

    (tmp_path / "change.pt").unlink()
    assert library.refresh() is True and library.names() == ["keep", "new"]


def test_symlink_cycle_does_not_hang_the_walk(tmp_path):
    put(tmp_path / "sub" / "one.pt", vec())
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    assert EmbeddingLibrary(tmp_path, {"": WIDTH}).names() == ["one"]


def test_loader_uses_files_added_changed_and_removed_while_the_model_stays_loaded(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    put(tmp_path / "broken.pt", vec(2, 48))          # listed as skipped; never an error while generating
    prompt = "a photo of zqxstyle"
    with torch.no_grad():
        plain = encode_prompts(adapter, [prompt])
        with EmbeddingLoader(adapter, tmp_path) as loader:
            assert torch.equal(loader.encode(adapter, [prompt]), plain)
            first = put(tmp_path / "zqxstyle.pt", vec(2, seed=1))
            with_first = loader.encode(adapter, [prompt])
            put(first, vec(3, seed=2))
            with_second = loader.encode(adapter, [prompt])
            first.unlink()
            assert torch.equal(loader.encode(adapter, [prompt]), plain)
        # The loader's encodings equal those made with a matcher over the same vectors.
        for vectors, got in ((vec(2, seed=1), with_first), (vec(3, seed=2), with_second)):
            emb = Embedding("zqxstyle", vectors)
            with patch_text_encoders(adapter):
                expected = encode_prompts(adapter, [prompt], matcher=EmbeddingMatcher(adapter.tokenizer, [emb]))
            assert torch.equal(got, expected)
        assert not torch.equal(with_first, with_second)
        assert torch.equal(encode_prompts(adapter, [prompt]), plain)  # unloaded: bit-identical


def test_loader_reports_the_embeddings_a_prompt_uses_with_their_file_hashes(tiny_model, tmp_path):
    import hashlib

    adapter = tiny_model("sd1")
    a = put(tmp_path / "zqxa.pt", vec(seed=1))
    b = put(tmp_path / "zqxb.pt", vec(seed=2))
    put(tmp_path / "zqxc.pt", vec(seed=3))
    with EmbeddingLoader(adapter, tmp_path) as loader:
        params = loader.infotext_params(["(zqxb:1.2) and zqxa, zqxb", "zqxa"])
        assert loader.infotext_params(["nothing here"]) == {}
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (a, b)}
    assert params == {"TI hashes": f"zqxb: {digest[b]}, zqxa: {digest[a]}"}


def test_loader_encode_outside_its_block_is_refused(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    loader = EmbeddingLoader(adapter, tmp_path)
    with pytest.raises(RuntimeError, match="inside its 'with' block"):
        loader.encode(adapter, ["x"])
