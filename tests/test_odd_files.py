"""Odd files in data folders: non-UTF-8 names train, FIFOs and device files named *.png are never read."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extensions_lib.train.dataset import scan_folder

BAD_NAME = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8, so Python holds surrogates


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)


def test_a_non_utf8_file_name_is_hashed_by_its_bytes(tmp_path):
    _image(tmp_path / "a.png", 0)
    _image(tmp_path / BAD_NAME, 1)
    dataset = scan_folder(tmp_path, width=64, height=64)
    assert len(dataset.entries) == 2
    digest = dataset.content_hash
    os.rename(tmp_path / BAD_NAME, tmp_path / os.fsdecode(b"caf\xe9 \xfe.png"))
    assert scan_folder(tmp_path, width=64, height=64).content_hash != digest  # the name counts, byte for byte


def test_training_on_a_folder_with_a_non_utf8_name(tiny_model, tmp_path):
    from extensions_lib.embeddings.session import train_embedding
    from test_embeddings_train import NAME, options, setup_run

    adapter = tiny_model("sd1")
    setup_run(adapter, tmp_path, "a photo of [name], [filewords]\n", images=1)
    _image(tmp_path / "data" / BAD_NAME, 3)
    result = train_embedding(adapter, options(tmp_path, steps=2, template_file=str(tmp_path / "template.txt")))
    assert result.step == 2 and (tmp_path / "emb" / f"{NAME}.pt").is_file()


@pytest.fixture
def odd_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "good.png", 0)
    os.mkfifo(src / "fifo.png")
    os.symlink("/dev/zero", src / "zero.png")
    return src


def _finishes(fn, odd_folder, seconds=60):
    """Run fn in a thread; a FIFO read would block forever, so unblock it by opening the write end."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with open(odd_folder / "fifo.png", "wb"):
            pass
        thread.join(10)
        pytest.fail("blocked reading a FIFO")
    assert "result" in outcome
    return outcome["result"]


def test_preprocess_reads_only_regular_files(odd_folder, tmp_path):
    import dataclasses

    from extensions_lib.preprocess.options import PreprocessOptions
    from extensions_lib.preprocess.run import preprocess_directory

    opts = dataclasses.replace(PreprocessOptions(width=64, height=64))
    summary = _finishes(lambda: preprocess_directory(odd_folder, tmp_path / "out", opts), odd_folder)
    assert summary.sources == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) != []


def test_the_training_dataset_and_tagger_read_only_regular_files(odd_folder):
    from extensions_lib.tagger.image_io import list_images

    dataset = _finishes(lambda: scan_folder(odd_folder, width=64, height=64), odd_folder)
    assert [e.path.name for e in dataset.entries] == ["good.png"]
    assert [p.name for p in list_images(odd_folder)] == ["good.png"]
