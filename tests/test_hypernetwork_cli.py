"""The command line: ``alchemy hypernetwork create|train`` and ``alchemy txt2img --hypernetwork``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.cli import main
from extensions_lib.commands.hypernetwork import parse_hypernetwork_flag, txt2img_hypernetworks
from extensions_lib.errors import AlchemyError
from extensions_lib.hypernetworks.file import read_hypernetwork, write_hypernetwork
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
from extensions_lib.safe_pickle import safe_load
from test_hypernetwork_train import dataset


def test_create_writes_the_webui_create_options(tmp_path, capsys):
    folder = tmp_path / "hns"
    args = ["hypernetwork", "create", "--name", "anime", "--hypernetwork-dir", str(folder), "--sizes", "768",
            "--sizes", "320", "--layer-structure", "1, 1.5, 1", "--activation", "swish", "--layer-norm",
            "--use-dropout", "--dropout-structure", "0, 0.1, 0", "--weight-init", "XavierNormal"]
    assert main(args) == 0
    path = folder / "anime.pt"
    assert capsys.readouterr().out.strip() == str(path)
    raw = safe_load(path)
    assert [k for k in raw if isinstance(k, int)] == [768, 320]
    assert (raw["layer_structure"], raw["activation_func"], raw["is_layer_norm"], raw["use_dropout"],
            raw["dropout_structure"], raw["weight_initialization"], raw["step"]) == \
        ([1.0, 1.5, 1.0], "swish", True, True, [0.0, 0.1, 0.0], "XavierNormal", 0)
    before = path.read_bytes()
    assert main(args) == 1  # exists: refused, file kept
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


def test_create_refuses_bad_options(tmp_path, capsys):
    base = ["hypernetwork", "create", "--name", "x", "--hypernetwork-dir", str(tmp_path)]
    assert main(base + ["--layer-structure", "2, 2, 1"]) == 1
    assert "start and end with 1" in capsys.readouterr().err
    assert main(base + ["--activation", "bogus"]) == 1
    assert "must be one of" in capsys.readouterr().err
    assert main(base + ["--sizes", "333"]) == 1
    assert "sizes" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_train_and_resume_from_the_command_line(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "hns"
    write_hypernetwork(Hypernetwork.create("hn", [32, 64], Architecture((1, 2, 1), "relu")), folder / "hn.pt")
    data = dataset(tmp_path / "data")
    common = ["hypernetwork", "train", "--ckpt", str(tiny_checkpoint("sd1")), "--device", "cpu"]
    args = common + ["--hypernetwork-name", "hn", "--hypernetwork-dir", str(folder), "--data-root", str(data),
                     "--template-file", "filewords", "--training-width", "64", "--training-height", "64",
                     "--steps", "3", "--seed", "4", "--log-directory", str(tmp_path / "logs"), "--save-every", "0",
                     "--create-image-every", "0", "--learn-rate", "1e-5"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(str(folder / "hn.pt")) and "warning" not in out.err
    assert read_hypernetwork(folder / "hn.pt").step == 3
    log_dir = next((tmp_path / "logs").glob("*/hn"))
    assert main(common + ["--resume", str(log_dir), "--steps", "5"]) == 0
    assert read_hypernetwork(folder / "hn.pt").step == 5
    assert main(args[:-2] + ["--learn-rate", "0.005", "--steps", "1", "--hypernetwork-dir", str(folder)]) == 0
    assert "destroy hypernetworks" in capsys.readouterr().err


def test_train_names_what_is_missing(tmp_path, tiny_checkpoint, capsys):
    assert main(["hypernetwork", "train", "--hypernetwork-name", "hn", "--hypernetwork-dir", str(tmp_path)]) == 1
    assert "--ckpt" in capsys.readouterr().err
    assert main(["hypernetwork", "train", "--ckpt", str(tiny_checkpoint("sd1")), "--hypernetwork-name", "hn",
                 "--hypernetwork-dir", str(tmp_path)]) == 1
    assert "no hypernetwork named 'hn'" in capsys.readouterr().err


# ---- txt2img ------------------------------------------------------------------------------------------------

def test_hypernetwork_flag_parsing():
    assert parse_hypernetwork_flag("anime") == ("anime", 1.0)
    assert parse_hypernetwork_flag("anime:0.6") == ("anime", 0.6)
    with pytest.raises(AlchemyError, match="not a number"):
        parse_hypernetwork_flag("anime:strong")
    with pytest.raises(AlchemyError, match="NAME"):
        parse_hypernetwork_flag(":0.5")


def test_prompt_tags_come_first_and_flags_do_not_repeat_them(tmp_path):
    for name in ("a", "b"):
        write_hypernetwork(Hypernetwork.create(name, [32], Architecture()), tmp_path / "sub" / f"{name}.pt")
    chosen = txt2img_hypernetworks(["a:0.3", "b"], tmp_path, "a cat <hypernet:a:0.5>, sitting")
    assert chosen.prompt == "a cat , sitting"
    assert [(hn.name, m) for hn, m in chosen.chosen] == [("a", 0.5), ("b", 1.0)]
    assert chosen.infotext == {"Hypernet": "a, b", "Hypernet strength": "0.5, 1"}
    none = txt2img_hypernetworks([], tmp_path / "missing", "plain prompt")
    assert none.chosen == [] and none.infotext == {} and none.prompt == "plain prompt"
    with pytest.raises(AlchemyError, match="no hypernetwork named 'c'"):
        txt2img_hypernetworks(["c"], tmp_path, "x")


def test_txt2img_reads_only_the_files_it_applies(tmp_path, monkeypatch):
    """A one-off generation does not read every file of a folder of (90 MB each) hypernetworks."""
    from extensions_lib.hypernetworks import file as file_module

    for name in ("a", "b", "c"):
        write_hypernetwork(Hypernetwork.create(name, [32], Architecture()), tmp_path / f"{name}.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    read = []
    real = file_module.safe_load
    monkeypatch.setattr(file_module, "safe_load", lambda path: read.append(path) or real(path))
    chosen = txt2img_hypernetworks(["b"], tmp_path, "x <hypernet:b:0.5>, <hypernet:c>")
    assert [(hn.name, m) for hn, m in chosen.chosen] == [("b", 0.5), ("c", 1.0)]
    assert sorted(p.name for p in read) == ["b.pt", "c.pt"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt2img_applies_hypernetworks_and_strength_zero_changes_nothing(tmp_path, tiny_checkpoint):
    folder = tmp_path / "hns"
    torch.manual_seed(0)
    for name in ("strong", "other"):
        hn = Hypernetwork.create(name, [32, 64], Architecture((1, 2, 1), "relu"), weight_init="KaimingNormal")
        write_hypernetwork(hn, folder / f"{name}.pt")
    base = ["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--device", "cpu", "--prompt", "a red square",
            "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--hypernetwork-dir", str(folder)]

    def run(name, *extra, prompt=None):
        out = tmp_path / f"{name}.png"
        args = base + ["--out", str(out), *extra]
        if prompt is not None:
            args[args.index("--prompt") + 1] = prompt
        assert main(args) == 0
        return out

    plain = run("plain")
    zero = run("zero", "--hypernetwork", "strong:0")
    one = run("one", "--hypernetwork", "strong")
    tagged = run("tagged", prompt="a red square<hypernet:strong:1>")
    chained = run("chained", "--hypernetwork", "strong", "--hypernetwork", "other:0.5")
    assert np.array_equal(_pixels(zero), _pixels(plain))
    assert not np.array_equal(_pixels(one), _pixels(plain))
    assert np.array_equal(_pixels(tagged), _pixels(one))
    assert not np.array_equal(_pixels(chained), _pixels(one))
    info = Image.open(chained).info["parameters"]
    assert info.startswith("a red square\n") and "Hypernet: \"strong, other\"" in info
    assert "Hypernet strength: \"1, 0.5\"" in info
    assert "Hypernet" not in Image.open(plain).info["parameters"]


def test_txt2img_bad_hypernetwork_input_is_explained(tmp_path, tiny_checkpoint, capsys):
    """Widths the model lacks: a warning naming them, and the image is the plain one. Files from other tools in
    the folder: they never disturb a generation; asking for one names the file and says what it is."""
    from extensions_lib.formats.torch_pt import save_pt

    folder = tmp_path / "hns"
    write_hypernetwork(Hypernetwork.create("wide", [768, 1024], Architecture((1, 2, 1), "relu"),
                                           weight_init="KaimingNormal"), folder / "wide.pt")
    write_hypernetwork(Hypernetwork.create("fits", [32], Architecture((1, 2, 1), "relu")), folder / "fits.pt")
    save_pt({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "emb"},
            folder / "emb.pt")
    save_pt({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, folder / "lo.pt")
    base = ["txt2img", "--ckpt", str(tiny_checkpoint("sd1")), "--device", "cpu", "--prompt", "a red square",
            "--steps", "1", "--width", "64", "--height", "64", "--seed", "3", "--hypernetwork-dir", str(folder)]
    assert main(base + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["--out", str(tmp_path / "wide.png"), "--hypernetwork", "wide",
                        "--hypernetwork", "fits:0"]) == 0
    err = capsys.readouterr().err
    assert "not in this model" in err and "wide width 768" in err and "wide width 1024" in err
    assert np.array_equal(_pixels(tmp_path / "wide.png"), _pixels(tmp_path / "plain.png"))

    for name, what in (("emb", "embedding"), ("lo", "LoRA")):
        assert main(base + ["--out", str(tmp_path / f"{name}.png"), "--hypernetwork", name]) == 1
        err = capsys.readouterr().err
        assert str(folder / f"{name}.pt") in err and what in err and "Traceback" not in err
        assert not (tmp_path / f"{name}.png").exists()
