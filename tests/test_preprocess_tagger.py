"""`alchemy preprocess` captioning through the tagger package, with a tiny WD14 model built here."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from extensions_lib.errors import AlchemyError
from extensions_lib.preprocess import cli
from extensions_lib.preprocess.options import CaptionAction, PreprocessOptions
from extensions_lib.preprocess.run import preprocess_directory
from extensions_lib.preprocess.tagging import tagger_captioner
from extensions_lib.tagger import CaptionOptions, caption_images, load_tagger

pytest.importorskip("onnx")
tagger_models = pytest.importorskip("tagger_models")


@pytest.fixture(scope="module")
def wd14(tmp_path_factory):
    return tagger_models.make_wd14_folder(tmp_path_factory.mktemp("wd14") / "tiny-wd14", size=32)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    rng = np.random.default_rng(5)
    for name, (w, h) in {"a": (96, 64), "b": (64, 128), "c": (80, 80)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{name}.png")
    (d / "b.txt").write_text("my_trigger, 1girl", encoding="utf-8")
    return d


def test_every_output_gets_the_taggers_caption_of_that_output(wd14, src, tmp_path):
    opts = CaptionOptions(general_threshold=0.3, character_threshold=0.6)
    captioner, caption_id, unload = tagger_captioner(str(wd14), opts)
    dst = tmp_path / "out"
    try:
        preprocess_directory(src, dst, PreprocessOptions(width=64, height=64, flip=True,
                                                         existing_caption=CaptionAction.PREPEND),
                             captioner=captioner, caption_id=caption_id)
    finally:
        unload()
    outputs = sorted(dst.glob("*.png"))
    assert len(outputs) == 6
    # Independent of the pipeline: load the model again and caption the written files one by one.
    tagger = load_tagger(wd14)
    try:
        expected = [caption_images(tagger, [Image.open(p).convert("RGB")], opts)[0] for p in outputs]
    finally:
        tagger.unload()
    # (flipped copies included: each is tagged on its own pixels)
    texts = {p.name: (p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").exists() else "")
             for p in outputs}
    assert any(expected)  # the thresholds leave tags to compare
    for path, new in zip(outputs, expected):
        if path.name.startswith("00001-"):  # b.png has an existing caption: prepended, repeats dropped
            existing = ["my_trigger", "1girl"]
            tags = existing + [t for t in new.split(", ") if t and t.replace(" ", "_") not in existing]
            assert texts[path.name] == ", ".join(tags)
        else:
            assert texts[path.name] == new


def test_cli_with_tagger_flags_and_resume_on_changed_thresholds(wd14, src, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="alchemy")
    cli.register(parser.add_subparsers(dest="command"))
    dst = tmp_path / "out"
    base = ["preprocess", str(src), str(dst), "--width", "64", "--height", "64", "--tagger-model", str(wd14)]
    args = parser.parse_args(base + ["--general-threshold", "0", "--max-tags", "2", "--trigger-tags", "zzz"])
    assert args.func(args) == 0
    caption = (dst / "00000-0-a.txt").read_text(encoding="utf-8")
    assert caption.split(", ")[0] == "zzz" and len(caption.split(", ")) == 3
    capsys.readouterr()
    args = parser.parse_args(base + ["--general-threshold", "0", "--max-tags", "2", "--trigger-tags", "zzz"])
    args.func(args)
    assert "3 already done" in capsys.readouterr().out
    args = parser.parse_args(base + ["--general-threshold", "0", "--max-tags", "1"])
    args.func(args)
    assert "3 of 3 source images processed" in capsys.readouterr().out
    assert len((dst / "00000-0-a.txt").read_text(encoding="utf-8").split(", ")) == 1


def test_missing_tagger_model_names_the_folder(tmp_path):
    with pytest.raises(AlchemyError) as err:
        tagger_captioner(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(err.value)


def test_bad_tagger_caption_options_fail_before_the_model_loads(wd14):
    with pytest.raises(AlchemyError, match="regular expression"):
        tagger_captioner(str(wd14), CaptionOptions(exclude=["/([/"]))
    with pytest.raises(AlchemyError, match="rating"):
        tagger_captioner(str(wd14), CaptionOptions(rating="top"))


def _flags(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    return {a.dest: (tuple(a.option_strings), a.help) for a in parser._actions if a.option_strings}


def test_preprocess_offers_the_tag_commands_model_source_flags(wd14, src, tmp_path, monkeypatch):
    from extensions_lib.commands import dataset
    from extensions_lib.preprocess import tagging
    from extensions_lib.tagger.options import MODEL_SOURCE_OPTIONS

    parser = argparse.ArgumentParser(prog="alchemy")
    commands = parser.add_subparsers(dest="command")
    dataset.register(commands)
    tag, preprocess = _flags(commands.choices["tag"]), _flags(commands.choices["preprocess"])
    for name in MODEL_SOURCE_OPTIONS:  # the same declaration renders the same flag and help in both
        assert preprocess[name] == tag[name], name

    loads = []
    real_load = tagging.load_tagger
    monkeypatch.setattr(tagging, "load_tagger",
                        lambda folder, **kw: loads.append((folder, kw)) or real_load(folder, **kw))
    dst = tmp_path / "out"
    args = parser.parse_args(["preprocess", str(src), str(dst), "--width", "64", "--height", "64",
                              "--tagger-model", wd14.name, "--models-dir", str(wd14.parent), "--device", "cpu",
                              "--device-id", "1", "--general-threshold", "0", "--max-tags", "1", "--recursive"])
    assert args.func(args) == 0
    assert loads == [(wd14, {"device": "cpu", "device_id": 1, "report": loads[0][1]["report"]})]
    assert len((dst / "00000-0-a.txt").read_text(encoding="utf-8").split(", ")) == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # --download of a known model: refused at once, folder named
    args = parser.parse_args(["preprocess", str(src), str(tmp_path / "out2"), "--tagger-model", "wd-vit-tagger-v3",
                              "--models-dir", str(tmp_path / "models"), "--download"])
    with pytest.raises(AlchemyError) as err:
        args.func(args)
    assert "HF_HUB_OFFLINE" in err.value.message and str(tmp_path / "models" / "wd-vit-tagger-v3") in str(err.value)
