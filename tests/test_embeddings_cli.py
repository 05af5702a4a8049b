"""``alchemy embedding create|train|list`` and ``alchemy txt2img --embeddings-dir`` end to end on the tiny model,
including Ctrl-C during training."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from extensions_lib.cli import main
from extensions_lib.formats.embedding import read_embedding

from test_embeddings_train import make_dataset

ROOT = Path(__file__).resolve().parents[1]
NAME = "zqxcli"


def train_args(ckpt, tmp: Path, emb: str, log: str, *extra: str) -> list[str]:
    return ["embedding", "train", "--ckpt", str(ckpt), "--embedding-name", NAME, "--embeddings-dir", str(tmp / emb),
            "--data-root", str(tmp / "data"), "--template-file", "subject", "--training-width", "64",
            "--training-height", "64", "--log-directory", str(tmp / log), "--seed", "3", "--save-every", "0",
            "--create-image-every", "0", *extra]


def test_create_train_resume_list_and_generate(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("sd1")
    make_dataset(tmp_path / "data", 3)
    for emb in ("emb", "emb2"):
        assert main(["embedding", "create", "--ckpt", str(ckpt), "--name", NAME, "--init-text", "red thing",
                     "--vectors", "2", "--embeddings-dir", str(tmp_path / emb)]) == 0
    created = (tmp_path / "emb" / f"{NAME}.pt").read_bytes()
    assert main(["embedding", "create", "--ckpt", str(ckpt), "--name", NAME, "--embeddings-dir",
                 str(tmp_path / "emb")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "emb" / f"{NAME}.pt").read_bytes() == created

    # Two steps, then --resume with --steps 4, equals four steps straight.
    assert main(train_args(ckpt, tmp_path, "emb", "logs", "--steps", "2")) == 0
    (log_dir,) = (tmp_path / "logs").glob(f"*/{NAME}")
    assert main(train_args(ckpt, tmp_path, "emb", "logs", "--resume", str(log_dir), "--steps", "4")) == 0
    assert main(train_args(ckpt, tmp_path, "emb2", "logs2", "--steps", "4")) == 0
    resumed, straight = (read_embedding(tmp_path / e / f"{NAME}.pt") for e in ("emb", "emb2"))
    assert resumed.step == straight.step == 4 and torch.equal(resumed.vectors, straight.vectors)

    (tmp_path / "emb" / "broken.pt").write_bytes(b"junk")
    capsys.readouterr()
    assert main(["embedding", "list", "--embeddings-dir", str(tmp_path / "emb"), "--ckpt", str(ckpt)]) == 0
    listing = capsys.readouterr().out
    assert f"{NAME} (width 32, 2 vectors)" in listing and "broken (unreadable)" in listing and "skipped" in listing

    common = ["txt2img", "--ckpt", str(ckpt), "--prompt", f"a photo of {NAME}", "--width", "64", "--height", "64",
              "--steps", "3", "--seed", "7"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "emb.png"), "--embeddings-dir", str(tmp_path / "emb")]) == 0
    assert "broken" in capsys.readouterr().err  # the skipped file is reported, generation goes on
    with Image.open(tmp_path / "emb.png") as image:
        assert f'TI hashes: "{NAME}: ' in image.info["parameters"]
        with Image.open(tmp_path / "plain.png") as plain:
            assert image.tobytes() != plain.tobytes()
            assert "TI hashes" not in plain.info["parameters"]


def test_ctrl_c_saves_the_embedding_and_optimizer_state_and_exits_130(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("sd1")
    make_dataset(tmp_path / "data", 2)
    assert main(["embedding", "create", "--ckpt", str(ckpt), "--name", NAME, "--embeddings-dir",
                 str(tmp_path / "emb")]) == 0
    args = train_args(ckpt, tmp_path, "emb", "logs", "--steps", "100000", "--write-csv-every", "1",
                      "--save-optimizer-state")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "extensions_lib", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        csv = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / "logs").glob(f"*/{NAME}/textual_inversion_loss.csv"))
            if found and len(found[0].read_text().splitlines()) >= 3:
                csv = found[0]
                break
            time.sleep(0.2)
        assert csv is not None, proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "continue with: alchemy embedding train" in err
    log_dir = csv.parent
    (snapshot,) = (log_dir / "embeddings").glob(f"{NAME}-*.pt")
    step = int(snapshot.stem.rsplit("-", 1)[1])
    assert step >= 2 and (log_dir / "embeddings" / f"{snapshot.name}.optim").is_file()
    assert read_embedding(snapshot).step == step and (log_dir / "resume-state.pt").is_file()
    # as the WebUI does on Interrupt, the embedding itself holds what was trained so far
    in_folder = read_embedding(tmp_path / "emb" / f"{NAME}.pt")
    assert in_folder.step == step and torch.equal(in_folder.vectors, read_embedding(snapshot).vectors)
    assert str(tmp_path / "emb" / f"{NAME}.pt") in out
