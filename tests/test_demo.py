"""The README's first command: the whole flow on the tiny demo model, through the real CLI."""
from __future__ import annotations

from PIL import Image

from extensions_lib.cli import main
from extensions_lib.formats.embedding import read_embedding


def test_demo_runs_the_whole_flow(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out

    trained = read_embedding(out / "embeddings" / "alchemy-demo.pt")
    assert trained.step == 4 and trained.vectors.shape[0] == 2
    assert len(list((out / "dataset").glob("*.png"))) == 16  # 8 samples + flipped copies
    assert list((out / "logs").rglob("textual_inversion_loss.csv"))

    preview = Image.open(out / "preview.png")
    params = preview.info["parameters"]
    # The preview really used the trained embedding: the infotext names it with its hash.
    assert params.startswith("a photo of alchemy-demo") and 'TI hashes: "alchemy-demo: ' in params
    for label in ("model", "trained embedding", "training log", "preview"):
        assert label in printed
