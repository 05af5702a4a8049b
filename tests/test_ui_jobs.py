"""The jobs behind the tabs, driven through the standalone runner on the tiny model (no gradio needed).

Each job must do what the library function it wraps does (same captions, same trained file, same
images), report its progress, and fail with a message naming the file and the fix, changing nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from extensions_lib.embeddings.options import CreateEmbeddingOptions, EmbeddingTrainOptions
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import read_embedding
from extensions_lib.hypernetworks.create import create_hypernetwork
from extensions_lib.hypernetworks.options import CreateHypernetworkOptions
from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
from extensions_lib.preprocess.options import PreprocessOptions
from extensions_lib.sampling.txt2img import GenerationOptions, generate_from
from extensions_lib.tagger import CaptionOptions, TagRunOptions, caption_images, decode_image, load_tagger
from extensions_lib.ui.app import ModelHolder, demo_checkpoint
from extensions_lib.jobs.context import UIContext
from extensions_lib.jobs.dataset import (PreprocessRequest, TagImageRequest, TagRequest, preprocess_folder,
                                            tag_folder, tag_image)
from extensions_lib.jobs.generate import GenerateRequest, Loaders, generate_images
from extensions_lib.jobs.progress import run_job
from extensions_lib.jobs.thread_runner import ThreadJobRunner
from extensions_lib.jobs.training import (CreateRequest, TrainRequest, create_embedding_file, for_context,
                                             train_embedding_file, train_hypernetwork_file, with_txt2img_preview)
from train_fakes import make_folder


@pytest.fixture
def context(tmp_path, tiny_checkpoint):
    changed = []
    ctx = UIContext(model=ModelHolder(tiny_checkpoint("sd1"), tmp_path / "cache"), embeddings_dir=tmp_path / "emb",
                    hypernetworks_dir=tmp_path / "hn", log_root=tmp_path / "logs",
                    tagger_models_dir=tmp_path / "taggers", cache_dir=tmp_path / "cache",
                    files_changed=changed.append)
    ctx.changed = changed
    return ctx


def small_training(cls, tmp_path, **kw):
    base = dict(data_root=str(make_folder(tmp_path / "data", n=3)), training_width=64, training_height=64,
                steps=4, seed=5, save_every=0, create_image_every=0, write_csv_every=0,
                template_file="subject_filewords")
    return cls(**{**base, **kw})


def images_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


# ---- dataset jobs --------------------------------------------------------------------------------------

def test_tagging_job_writes_the_taggers_own_captions(context, tmp_path):
    from tagger_models import make_wd14_folder

    make_wd14_folder(context.tagger_models_dir / "tiny")
    folder = make_folder(tmp_path / "imgs", n=5, captions=False)
    caption = CaptionOptions(general_threshold=0.4, character_threshold=0.6)
    p = run_job(ThreadJobRunner(), tag_folder, TagRequest(str(folder), "tiny", TagRunOptions(), caption, context),
                title="tag")
    assert p.state == "done", p.error
    assert (p.step, p.total, p.unit) == (5, 5, "image") and p.result.written == 5
    tagger = load_tagger(context.tagger_models_dir / "tiny")
    expected = caption_images(tagger, [decode_image(f) for f in sorted(folder.glob("*.png"))], caption)
    tagger.unload()
    assert [f.read_text(encoding="utf-8") for f in sorted(folder.glob("*.txt"))] == expected
    assert any((context.cache_dir / "tagger").iterdir()), "the score cache belongs in the app's cache folder"

    one = decode_image(sorted(folder.glob("*.png"))[1])
    p = run_job(ThreadJobRunner(), tag_image, TagImageRequest(one, "tiny", TagRunOptions(), caption, context),
                title="one")
    assert p.state == "done" and p.result == expected[1] and not list(folder.glob("*.txt.*"))


@pytest.mark.parametrize("folder, model, expected", [
    ("", "tiny", "no image folder given"),
    ("missing", "tiny", "missing: image folder not found"),
    (".", "", "no tagger model chosen"),
    (".", "nope", "tagger model 'nope' not found"),
])
def test_tagging_bad_input_fails_clearly(context, tmp_path, folder, model, expected):
    folder = str(tmp_path / folder) if folder else ""
    p = run_job(ThreadJobRunner(), tag_folder, TagRequest(folder, model, TagRunOptions(), CaptionOptions(), context),
                title="tag")
    assert p.state == "failed" and expected in p.error


def test_preprocess_job_writes_the_training_folder(context, tmp_path):
    src = make_folder(tmp_path / "src", n=2, size=(96, 64))
    dst = tmp_path / "dst"
    request = PreprocessRequest(str(src), str(dst), PreprocessOptions(width=64, height=64, flip=True),
                                CaptionOptions(), context)
    p = run_job(ThreadJobRunner(), preprocess_folder, request, title="pre")
    assert p.state == "done", p.error
    assert sorted(f.name for f in dst.glob("*.png")) == ["00000-0-img0.png", "00000-1-img0.png",
                                                         "00001-0-img1.png", "00001-1-img1.png"]
    assert "2 of 2 source images processed" in p.message and (p.step, p.total) == (2, 2)
    missing = run_job(ThreadJobRunner(), preprocess_folder, dataclasses.replace(request, destination=" "), title="x")
    assert missing.state == "failed" and "no destination folder given" in missing.error


def test_preprocess_captions_through_the_tag_tabs_model_slot(context, tmp_path):
    """One tagger resident at a time: preprocessing takes the shared slot's model (replacing the one the
    tag tab loaded), and its captions are the tagger's own."""
    from tagger_models import make_wd14_folder

    make_wd14_folder(context.tagger_models_dir / "tiny")
    make_wd14_folder(context.tagger_models_dir / "other", seed=3)
    first = context.tagger().get(context.tagger_models_dir / "other")
    src = make_folder(tmp_path / "src", n=2, size=(64, 64), captions=False)
    dst = tmp_path / "dst"
    caption = CaptionOptions(general_threshold=0.4)
    request = PreprocessRequest(str(src), str(dst), PreprocessOptions(width=64, height=64, tagger_model="tiny"),
                                caption, context)
    p = run_job(ThreadJobRunner(), preprocess_folder, request, title="pre")
    assert p.state == "done", p.error
    slot_tagger = context.tagger().current
    assert slot_tagger is not None and slot_tagger is not first
    assert first.session is None  # the replaced model was unloaded
    outputs = sorted(dst.glob("*.png"))
    expected = caption_images(slot_tagger, [decode_image(f) for f in outputs], caption)
    assert [f.with_suffix(".txt").read_text(encoding="utf-8") for f in outputs] == expected


# ---- embeddings -----------------------------------------------------------------------------------------

def test_create_train_and_generate_with_an_embedding(context, tmp_path):
    runner = ThreadJobRunner()
    created = run_job(runner, create_embedding_file, CreateRequest(
        CreateEmbeddingOptions(name="uicat", init_text="cat", num_vectors_per_token=2), context), title="create")
    assert created.state == "done", created.error
    path = context.embeddings_dir / "uicat.pt"
    assert created.result == path and read_embedding(path).num_vectors == 2
    before = read_embedding(path).vectors.clone()

    options = small_training(EmbeddingTrainOptions, tmp_path, embedding_name="uicat", log_directory="runs")
    trained = run_job(runner, train_embedding_file, TrainRequest(options, context), title="train")
    result = trained.result
    assert trained.state == "done", trained.error
    assert result.final_path == path and result.log_dir.is_relative_to(context.log_root / "runs")
    assert trained.loss_points == [(s, v) for s, v in result.losses] and len(result.losses) == 4
    assert f"Trained embedding uicat for 4 steps: {path}" in trained.message
    after = read_embedding(path)
    assert after.step == 4 and not torch.equal(after.vectors, before)
    assert context.changed == ["embeddings", "embeddings"]

    # generating with the name in the prompt is generating through the embeddings loader itself
    from extensions_lib.embeddings.loader import EmbeddingLoader

    opts = GenerationOptions(prompt="a photo of uicat", width=64, height=64, steps=3, seed=11)
    made = run_job(runner, generate_images, GenerateRequest(opts, Loaders(context)), title="gen")
    assert made.state == "done", made.error
    adapter = context.model()
    with EmbeddingLoader(adapter, context.embeddings_dir) as loader:
        direct = generate_from(adapter, opts, encode_fn=loader.encode)[0]
    plain = generate_from(adapter, dataclasses.replace(opts, prompt="a photo of cat"))[0]
    assert images_equal(made.result[0], direct) and not images_equal(made.result[0], plain)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "uicat: {sha}"' in made.result[0].info["parameters"]
    assert (made.step, made.total) == (3, 3)


def test_bad_training_input_fails_clearly_and_changes_nothing(context, tmp_path):
    runner = ThreadJobRunner()
    run_job(runner, create_embedding_file, CreateRequest(CreateEmbeddingOptions(name="keep"), context),
            title="create")
    path = context.embeddings_dir / "keep.pt"
    original = path.read_bytes()
    options = small_training(EmbeddingTrainOptions, tmp_path, embedding_name="keep",
                             data_root=str(tmp_path / "no-such-folder"))
    p = run_job(runner, train_embedding_file, TrainRequest(options, context), title="train")
    assert p.state == "failed" and "no-such-folder" in p.error
    unknown = run_job(runner, train_embedding_file,
                      TrainRequest(dataclasses.replace(options, embedding_name="ghost"), context), title="train")
    assert unknown.state == "failed" and "no embedding named 'ghost'" in unknown.error
    assert path.read_bytes() == original

    no_model = dataclasses.replace(context, model=UIContext().model)
    p = run_job(runner, create_embedding_file, CreateRequest(CreateEmbeddingOptions(name="x"), no_model),
                title="create")
    assert p.state == "failed" and p.error == "no model is loaded (load a Stable Diffusion checkpoint first)"


# ---- hypernetworks --------------------------------------------------------------------------------------

def test_hypernetwork_toggle_and_prompt_tag_apply_the_same_network(context):
    create_hypernetwork(CreateHypernetworkOptions(name="hn", sizes=[32, 64], weight_init="XavierNormal"),
                        context.hypernetworks_dir)
    runner, loaders = ThreadJobRunner(), Loaders(context)
    opts = GenerationOptions(prompt="a house", width=64, height=64, steps=3, seed=3)

    def make(request):
        p = run_job(runner, generate_images, request, title="gen")
        assert p.state == "done", p.error
        return p.result[0]

    toggled = make(GenerateRequest(opts, loaders, hypernetwork="hn", hypernetwork_strength=0.5))
    tagged = make(GenerateRequest(dataclasses.replace(opts, prompt="a house <hypernet:hn:0.5>"), loaders))
    plain = make(GenerateRequest(opts, loaders))
    assert images_equal(toggled, tagged) and not images_equal(toggled, plain)
    assert "Hypernet: hn, Hypernet strength: 0.5" in toggled.info["parameters"]
    # the patch is gone after each generation: the plain image is the unpatched model's
    assert images_equal(plain, generate_from(context.model(), opts)[0])


def test_train_hypernetwork_job(context, tmp_path):
    create_hypernetwork(CreateHypernetworkOptions(name="hn2", sizes=[32, 64]), context.hypernetworks_dir)
    options = small_training(HypernetworkTrainOptions, tmp_path, hypernetwork_name="hn2", steps=3)
    p = run_job(ThreadJobRunner(), train_hypernetwork_file, TrainRequest(options, context), title="train")
    assert p.state == "done", p.error
    assert p.result.final_path == context.hypernetworks_dir / "hn2.pt" and p.result.step == 3
    assert p.loss_points == [(s, v) for s, v in p.result.losses] and context.changed == ["hypernetworks"]


# ---- option plumbing ------------------------------------------------------------------------------------

def test_txt2img_preview_parameters_fill_the_preview_options():
    values = ["a cat", "blurry", 12, "Euler a", 5.5, 42, 256, 320]
    hn, note = with_txt2img_preview(HypernetworkTrainOptions(preview_from_txt2img=True), values)
    assert (hn.preview_prompt, hn.preview_negative_prompt, hn.preview_steps, hn.preview_sampler, hn.preview_cfg_scale,
            hn.preview_seed, hn.preview_width, hn.preview_height) == ("a cat", "blurry", 12, "euler_a", 5.5, 42, 256,
                                                                      320)
    assert note == ""
    for off in (EmbeddingTrainOptions(preview_from_txt2img=False), HypernetworkTrainOptions()):
        assert with_txt2img_preview(off, values) == (off, "")
    on, note = with_txt2img_preview(EmbeddingTrainOptions(preview_from_txt2img=True),
                                    ["x", "", 20, "DPM++ 2M Karras", 7, -1, 512, 512])
    assert on.preview_sampler == "euler" and "DPM++ 2M Karras" in note and on.preview_prompt == "x"
    with pytest.raises(AlchemyError, match="preview_steps"):
        with_txt2img_preview(HypernetworkTrainOptions(preview_from_txt2img=True),
                             ["x", "", 0, "Euler", 7, -1, 512, 512])


def test_options_point_at_the_hosts_folders(context, tmp_path):
    o = for_context(EmbeddingTrainOptions(log_directory="textual_inversion", seed=-1), context)
    assert o.log_directory == str(context.log_root / "textual_inversion")
    assert o.embeddings_dir == str(context.embeddings_dir) and o.seed >= 0
    absolute = for_context(HypernetworkTrainOptions(log_directory=str(tmp_path / "abs"), seed=9), context)
    assert absolute.log_directory == str(tmp_path / "abs") and absolute.seed == 9
    assert absolute.hypernetwork_dir == str(context.hypernetworks_dir)


def test_model_holder(tmp_path):
    with pytest.raises(AlchemyError) as info:
        ModelHolder(tmp_path / "none.safetensors", tmp_path)
    assert str(tmp_path / "none.safetensors") in info.value.message and "--ckpt" in info.value.fix
    path = demo_checkpoint(tmp_path / "cache")
    stamp = path.stat().st_mtime_ns
    assert demo_checkpoint(tmp_path / "cache") == path and path.stat().st_mtime_ns == stamp  # built once
