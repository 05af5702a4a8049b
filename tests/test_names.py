"""Every name that becomes part of a path goes through one check; names read from inside files are untrusted."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.names import child_path, is_valid_name

ESCAPES = ["../../x", "..", ".", "/etc/x", "a/b", "a\\b", "C:x", "x\x00y", "x\ny", "", "   ", "é" * 150]
PLAIN = ["my-style", "zqx thing (v2)", "näme.v1", "a..b", "x" * 200]


@pytest.mark.parametrize("name", ESCAPES)
def test_names_that_would_leave_their_folder_are_refused(name, tmp_path):
    assert not is_valid_name(name)
    with pytest.raises(AlchemyError) as info:
        child_path(tmp_path, name, "embedding name", ".pt")
    assert "embedding name" in str(info.value)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_names_stay_directly_inside_the_folder(name, tmp_path):
    path = child_path(tmp_path, name, suffix=".pt")
    assert path.parent == tmp_path and path.name == f"{name}.pt"


def test_non_text_names_are_refused():
    assert not is_valid_name(None) and not is_valid_name(3) and not is_valid_name(b"x")


def test_the_run_log_folder_refuses_an_escaping_name(tmp_path):
    from extensions_lib.train.run_log import log_dir_for

    day = datetime.date(2024, 1, 2)
    assert log_dir_for(tmp_path, "ok", day) == tmp_path / "2024-01-02" / "ok"
    for name in ("../../x", "/abs", ".."):
        with pytest.raises(AlchemyError, match="training run name"):
            log_dir_for(tmp_path, name, day)


def _vectors():
    return torch.arange(8, dtype=torch.float32).reshape(2, 4) / 10


@pytest.mark.parametrize("stored", ["../../x", "/tmp/evil", "a/b", "..", "x\x00y", 5, None])
def test_an_embedding_images_stored_name_is_used_only_when_it_is_a_plain_name(stored, tmp_path):
    from extensions_lib.formats.embedding import Embedding, read_embedding
    from extensions_lib.formats.embedding_image import save_embedding_image

    path = tmp_path / "pic.png"
    save_embedding_image(Embedding(name="placeholder", vectors=_vectors(), step=1), path)
    _rewrite_stored_name(path, stored)
    assert read_embedding(path).name == "pic"
    _rewrite_stored_name(path, "fine name")
    assert read_embedding(path).name == "fine name"


def _rewrite_stored_name(path: Path, name) -> None:
    """Write `path` again with `name` stored in both the text chunk and the pixels (as a hostile tool would)."""
    from extensions_lib.formats import embedding_image as module
    from extensions_lib.formats.embedding import read_embedding

    embedding = read_embedding(path)
    original = module.image_data

    def hostile(e):
        return {**original(e), "name": name}

    module.image_data = hostile
    try:
        module.save_embedding_image(embedding, path)
    finally:
        module.image_data = original


def test_a_hypernetwork_files_name_field_is_untrusted(tmp_path):
    from extensions_lib.formats.torch_pt import save_pt
    from extensions_lib.hypernetworks.file import read_hypernetwork, to_file_dict
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

    torch.manual_seed(0)
    hn = Hypernetwork.create("good", [8], Architecture(layer_structure=[1, 2, 1]))
    data = to_file_dict(hn)
    data["name"] = "../../outside"
    save_pt(data, tmp_path / "hn.pt")
    assert read_hypernetwork(tmp_path / "hn.pt").name == "hn"


@pytest.mark.parametrize("name", ["..", ".", "/..", "../"])
def test_creating_a_hypernetwork_refuses_names_that_leave_the_folder(name):
    from extensions_lib.hypernetworks.options import sanitize_name

    with pytest.raises(AlchemyError):
        sanitize_name(name)


@pytest.mark.parametrize("name", ["../x", "..", "a/b"])
def test_creating_an_embedding_refuses_names_that_leave_the_folder(name):
    from extensions_lib.embeddings.create import check_name

    with pytest.raises(AlchemyError):
        check_name(name)


def test_training_an_embedding_whose_image_names_a_path_writes_only_inside_the_log_folder(tiny_model, tmp_path):
    """The issue's case: a PNG embedding whose JSON says ``name: ../../x``; every file the run writes
    stays under the log folder and the embeddings folder."""
    from extensions_lib.embeddings.session import train_embedding
    from test_embeddings_train import make_dataset, options

    from extensions_lib.formats.embedding import Embedding
    from extensions_lib.formats.embedding_image import save_embedding_image

    adapter = tiny_model("sd1")
    width = adapter.text_encoders[0].width
    (tmp_path / "emb").mkdir()
    path = tmp_path / "emb" / "zqxthing.png"
    save_embedding_image(Embedding(name="zqxthing", vectors=torch.zeros(1, width), step=0), path)
    _rewrite_stored_name(path, "../../escaped")
    make_dataset(tmp_path / "data", 2)
    (tmp_path / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
    before = {p for p in tmp_path.parent.rglob("*")}
    result = train_embedding(adapter, options(tmp_path, steps=2, save_every=1, create_image_every=0))
    written = {p for p in tmp_path.parent.rglob("*")} - before
    assert written and all(p.resolve().is_relative_to(tmp_path.resolve()) for p in written)
    assert result.log_dir.name == "zqxthing"
