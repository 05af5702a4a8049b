"""The caption composer and the folder pipeline: budget, keep-first, policies, outputs, caches, one model
resident at a time, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from captioner_models import make_blip_folder, make_clip_folder, write_label_lists
from extensions_lib.captioners import (BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions, Models,
                                       Parts, caption_directory, compose, load_blip, token_count)
from extensions_lib.tagger import ModelSlot

WORDS = ["red", "green", "blue", "tall", "soft", "dark", "bright", "old"]


def test_composer_budget_keep_first_and_dedupe():
    parts = Parts(tags=["1girl", "long_hair", "smile", "red eyes", "Long Hair"], sentence="a woman with a hat",
                  clip=["oil painting", "by someone", "smile"])
    opts = ComposeOptions(trigger_words=["sks"], order=["trigger", "tags", "sentence", "clip"], token_budget=0)
    full = compose(parts, opts)
    assert full.items == ["sks", "1girl", "long_hair", "smile", "red eyes", "a woman with a hat", "oil painting",
                          "by someone"]
    assert full.keep_tokens == 1 and full.text == ", ".join(full.items)
    for budget in range(8, 30):
        got = compose(parts, ComposeOptions(trigger_words=["sks"], token_budget=budget,
                                            order=["trigger", "tags", "sentence", "clip"]))
        assert token_count(got.text) <= budget
        assert "sks" in got.items and "a woman with a hat" in got.items  # protected: never dropped
        droppable = [i for i in full.items if i not in ("sks", "a woman with a hat")]
        kept = [i for i in got.items if i in droppable]
        assert kept == droppable[:len(kept)]  # dropped from the end only
        assert got.dropped == droppable[len(kept):]
    first = compose(parts, ComposeOptions(trigger_words=["sks"], keep_first=3, token_budget=5))
    assert first.items[:3] == ["sks", "1girl", "long_hair"] and first.keep_tokens == 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap-models")
    return make_blip_folder(root / "blip"), make_clip_folder(root / "clip")


@pytest.fixture()
def lists_dir(tmp_path):
    return write_label_lists(tmp_path / "lists", WORDS)


def make_images(folder, n, start=0):
    folder.mkdir(exist_ok=True)
    for i in range(start, start + n):
        y, x = np.mgrid[0:40, 0:44]
        arr = np.stack([(x * (i + 1) * 11) % 256, (y * (9 - i) * 7) % 256, np.full_like(x, 40 * i)], -1)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i}.png")


class SpySlot(ModelSlot):
    """Records what is resident: never two models at once."""

    def __init__(self):
        super().__init__()
        self.events = []

    def get(self, folder, **kw):
        model = super().get(folder, **kw)
        self.events.append(("get", model.kind))
        return model

    def unload(self):
        if self.current is not None:
            self.events.append(("unload", self.current.kind))
        super().unload()


def run(folder, models, lists_dir, tmp_path, slot=None, **compose_kw):
    blip, clip = models
    compose_kw.setdefault("outputs", ["txt", "kohya_json", "metadata_jsonl"])
    return caption_directory(folder, Models(blip=blip, clip=clip, clip_name="tiny/test"),
                             CaptionRunOptions(labels_dir=lists_dir, cache_dir=tmp_path / "cache",
                                               labels_cache_dir=tmp_path / "ci-cache"),
                             ComposeOptions(trigger_words=["sks"], token_budget=60, **compose_kw),
                             slot=slot or ModelSlot(), blip_opts=BlipOptions(max_length=10),
                             clip_opts=InterrogateOptions(mode="fast", max_flavors=4))


def test_folder_run_writes_all_outputs_and_reruns_only_new_images(models, lists_dir, tmp_path):
    folder = tmp_path / "data"
    make_images(folder, 3)
    slot = SpySlot()
    summary = run(folder, models, lists_dir, tmp_path, slot)
    assert summary.written == 3 and summary.inferred == {"sentence": 3, "clip": 3}
    assert slot.events == [("get", "blip"), ("unload", "blip"), ("get", "clip")]  # one resident at a time
    assert sorted(p.name for p in (tmp_path / "ci-cache").iterdir()) == [
        f"tiny_test_{t}.safetensors" for t in ("artists", "flavors", "mediums", "movements", "trendings")]

    sentences = load_blip(models[0], device="cpu").caption(
        [Image.open(folder / f"img{i}.png").convert("RGB") for i in range(3)], BlipOptions(max_length=10))
    meta = json.loads((folder / "meta_cap.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    for i in range(3):
        text = (folder / f"img{i}.txt").read_text(encoding="utf-8")
        assert text.startswith(f"sks, {sentences[i]}, ") and token_count(text) <= 60
        assert meta[f"img{i}"]["caption"] == text
        assert {"file_name": f"img{i}.png", "text": text} in rows

    make_images(folder, 1, start=3)
    again = run(folder, models, lists_dir, tmp_path)  # skip policy: only the new image is captioned
    assert again.kept_existing == 3 and again.written == 1 and again.inferred == {"sentence": 1, "clip": 1}
    assert len((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()) == 4

    (folder / "img0.txt").write_text("my own words, sks", encoding="utf-8")
    before = (folder / "img1.txt").read_text(encoding="utf-8")
    redo = run(folder, models, lists_dir, tmp_path, existing_caption="append", outputs=["txt"])
    assert redo.inferred == {"sentence": 0, "clip": 0} and redo.from_cache == {"sentence": 4, "clip": 4}
    assert (folder / "img0.txt").read_text(encoding="utf-8").startswith("sks, my own words, " + sentences[0])
    assert (folder / "img1.txt").read_text(encoding="utf-8") == before  # our own parts replaced, not doubled


def test_cli_caption_and_interrogate(models, lists_dir, tmp_path, capsys):
    from extensions_lib.cli import main

    folder = tmp_path / "cli"
    make_images(folder, 2)
    blip, clip = models
    common = ["--labels-dir", str(lists_dir), "--cache-dir", str(tmp_path / "c"), "--clip-path", str(clip),
              "--clip-model", "tiny/test"]
    assert main(["caption", str(folder), "--blip-model", str(blip), "--trigger-words", "sks", "--max-length", "10",
                 "--max-flavors", "3", *common]) == 0
    assert (folder / "img0.txt").read_text(encoding="utf-8").startswith("sks, ")
    capsys.readouterr()
    assert main(["interrogate", str(folder / "img1.png"), "--mode", "classic", *common]) == 0
    prompt = capsys.readouterr().out.strip()
    assert prompt.count(", ") >= 5 and "artist" in prompt and "medium" in prompt
    assert main(["caption", str(tmp_path / "missing"), "--blip-model", str(blip)]) == 1


def test_bad_images_are_skipped_once_and_other_entries_kept(models, lists_dir, tmp_path):
    from extensions_lib.errors import AlchemyError

    folder = tmp_path / "mixed"
    make_images(folder, 2)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "meta_cap.json").write_text(json.dumps({"other": {"caption": "x", "tags": "y"}}), encoding="utf-8")
    summary = run(folder, models, lists_dir, tmp_path, outputs=["kohya_json"])
    assert summary.written == 2 and [s[0] for s in summary.skipped] == [str(folder / "broken.png")]
    meta = json.loads((folder / "meta_cap.json").read_text(encoding="utf-8"))
    assert meta["other"] == {"caption": "x", "tags": "y"} and set(meta) == {"other", "img0", "img1"}
    assert not (folder / "img0.txt").exists()

    (folder / "metadata.jsonl").write_text('{"file_name": "a.png"}\nnot json\n', encoding="utf-8")
    with pytest.raises(AlchemyError, match="line 2") as err:
        run(folder, models, lists_dir, tmp_path, outputs=["metadata_jsonl"])
    assert err.value.path == str(folder / "metadata.jsonl")


def test_unnamed_clip_weights_never_share_another_models_label_cache(models, tmp_path):
    from extensions_lib.commands.captions import resolve_models
    from extensions_lib.errors import AlchemyError

    clip = models[1]
    assert resolve_models(CaptionRunOptions(clip_path=clip)).clip_name == clip.name
    named = resolve_models(CaptionRunOptions(clip_path=clip, clip_model="sd1"))
    assert named.clip_name == "ViT-L-14/openai" and named.clip == clip
    with pytest.raises(AlchemyError, match="not found"):
        resolve_models(CaptionRunOptions(clip_model="sd2", models_dir=tmp_path))


def test_tagger_tags_join_the_caption_from_the_shared_score_cache(models, tmp_path):
    from tagger_models import make_wd14_folder

    from extensions_lib.tagger import CaptionOptions, load_tagger, predict_images
    from extensions_lib.tagger.captions import caption_tags

    tagger_dir = make_wd14_folder(tmp_path / "wd")
    folder = tmp_path / "tagged"
    make_images(folder, 3)
    seen = []

    def go():
        return caption_directory(folder, Models(tagger=tagger_dir, blip=models[0]),
                                 CaptionRunOptions(cache_dir=tmp_path / "cache"),
                                 ComposeOptions(trigger_words=["sks"], token_budget=0, existing_caption="overwrite"),
                                 slot=ModelSlot(), blip_opts=BlipOptions(max_length=10),
                                 tag_opts=CaptionOptions(general_threshold=0.2),
                                 progress=lambda done, total: seen.append((done, total)))

    first = go()
    assert first.inferred["tags"] == 3 and seen[-1] == (9, 9) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    tagger = load_tagger(tagger_dir)
    ims = [Image.open(folder / f"img{i}.png").convert("RGB") for i in range(3)]
    scores = predict_images(tagger, ims)
    sentences = load_blip(models[0], device="cpu").caption(ims, BlipOptions(max_length=10))
    for i in range(3):
        tags = caption_tags(scores[i], tagger.labels, CaptionOptions(general_threshold=0.2), tagger.default_thresholds)
        assert tags, "the tiny tagger should give some tags at 0.2"
        expected = compose(Parts(tags=tags, sentence=sentences[i]), ComposeOptions(trigger_words=["sks"], token_budget=0))
        assert (folder / f"img{i}.txt").read_text(encoding="utf-8") == expected.text
    again = go()
    assert again.inferred["tags"] == 0 and again.from_cache["tags"] == 3
