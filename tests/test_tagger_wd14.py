"""WD14 ONNX tagger: signature read from the model, numbers equal to the torch network, batching."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.tagger import CaptionOptions, ModelSlot, load_tagger, predict_images, render_caption
from extensions_lib.tagger.wd14 import Wd14Tagger, available_cores, cpu_split
from tagger_models import TinyWd14, export_onnx, make_wd14_folder, random_image, tag_rows, write_selected_tags


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd14")
    return {
        "free": make_wd14_folder(root / "free", size=32, free_batch=True, seed=1),
        "fixed": make_wd14_folder(root / "fixed", size=32, free_batch=False, seed=1),
        "big": make_wd14_folder(root / "big", size=48, free_batch=True, seed=2),
    }


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    sizes = [(40, 25), (25, 40), (32, 32), (100, 60), (17, 90), (64, 64), (50, 51)]
    return [random_image(rng, w, h, "RGBA" if i % 3 == 0 else "RGB") for i, (w, h) in enumerate(sizes)]


def test_signature_is_read_from_the_model(folders):
    free, fixed, big = (load_tagger(folders[k]) for k in ("free", "fixed", "big"))
    assert (free.input_size, free.fixed_batch) == (32, None)
    assert (fixed.input_size, fixed.fixed_batch) == (32, 1)
    assert big.input_size == 48 and big.prepare(random_image(np.random.default_rng(0), 10, 20)).shape == (48, 48, 3)
    assert isinstance(free, Wd14Tagger) and free.kind == "wd14" and len(free.labels) == len(tag_rows())


def test_scores_equal_the_torch_network(folders, images):
    tagger = load_tagger(folders["free"])
    batch = np.stack([tagger.prepare(im) for im in images])
    net = TinyWd14(len(tag_rows()), seed=1).eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(tagger.predict(batch), expected, atol=1e-5, rtol=0)


def test_batched_and_per_image_runs_agree(folders, images):
    free, fixed = load_tagger(folders["free"]), load_tagger(folders["fixed"])
    batched = predict_images(free, images, batch_size=4)
    one_by_one = np.concatenate([predict_images(free, [im]) for im in images])
    fixed_batch = predict_images(fixed, images, batch_size=4)  # the fixed model still runs one per call
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6, rtol=0)
    np.testing.assert_allclose(batched, fixed_batch, atol=1e-6, rtol=0)
    opts = CaptionOptions(general_threshold=0.5, character_threshold=0.5)
    captions = [render_caption(row, free.labels, opts) for row in batched]
    assert captions == [render_caption(row, free.labels, opts) for row in one_by_one]
    assert captions == [render_caption(row, fixed.labels, opts) for row in fixed_batch]
    assert len(set(captions)) > 1, "tiny model should caption different images differently"


def test_fixed_batch_model_gets_exactly_its_batch(folders, images, monkeypatch):
    tagger = load_tagger(folders["fixed"])
    seen = []
    real_run = tagger.session.run

    def spy(names, feeds):
        seen.append(next(iter(feeds.values())).shape[0])
        return real_run(names, feeds)

    monkeypatch.setattr(tagger.session, "run", spy, raising=False)
    tagger.predict(np.stack([tagger.prepare(im) for im in images[:3]]))
    assert seen == [1, 1, 1]


def test_cpu_cores_split_between_two_runs_and_the_numbers_stay_the_same(folders, images):
    assert [cpu_split(n) for n in (1, 2, 3, 16)] == [(1, 1), (2, 1), (2, 2), (2, 8)]
    assert cpu_split(16, intra_threads=3) == (1, 3)  # an explicit thread count: one run
    split = Wd14Tagger(folders["big"], device="cpu")
    assert split.parallel_runs == cpu_split(available_cores())[0]
    one_run = Wd14Tagger(folders["big"], device="cpu", intra_threads=2)
    assert one_run.parallel_runs == 1
    batch = np.stack([split.prepare(im) for im in images])
    np.testing.assert_array_equal(split.predict(batch), one_run.predict(batch))


def test_tag_list_that_does_not_fit_the_model(tmp_path):
    folder = make_wd14_folder(tmp_path / "m", size=32)
    write_selected_tags(folder / "selected_tags.csv", tag_rows()[:-2])
    with pytest.raises(AlchemyError) as err:
        load_tagger(folder)
    assert "selected_tags.csv" in err.value.message and str(folder / "model.onnx") in err.value.message


def test_nchw_model_is_refused(tmp_path):
    class Nchw(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x.mean(dim=(2, 3)))

    folder = tmp_path / "nchw"
    folder.mkdir()
    write_selected_tags(folder / "selected_tags.csv", [("a", 0), ("b", 0), ("c", 0)])
    import inspect, io, warnings
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Nchw(), (torch.rand(1, 3, 16, 16),), buf, input_names=["x"], output_names=["y"], **kwargs)
    (folder / "model.onnx").write_bytes(buf.getvalue())
    with pytest.raises(AlchemyError, match="NHWC"):
        load_tagger(folder)


def test_missing_files_name_the_folder_and_fix(tmp_path):
    with pytest.raises(AlchemyError) as err:
        Wd14Tagger(tmp_path)
    assert str(tmp_path) in err.value.message and "selected_tags.csv" in err.value.message


def test_model_slot_keeps_one_model_and_unload_frees_it(folders):
    slot = ModelSlot()
    first = slot.get(folders["free"])
    assert slot.get(folders["free"]) is first
    session_ref = weakref.ref(first.session)
    second = slot.get(folders["fixed"])
    assert second is not first and first.session is None
    gc.collect()
    assert session_ref() is None, "the first model's onnxruntime session is still alive"
    tagger_ref = weakref.ref(second)
    del first, second
    slot.unload()
    gc.collect()
    assert slot.current is None and tagger_ref() is None
    with pytest.raises(AlchemyError, match="unloaded"):
        t = load_tagger(folders["free"])
        t.unload()
        t.predict(np.zeros((1, 32, 32, 3), np.float32))


def test_model_id_changes_with_weights(tmp_path):
    a = make_wd14_folder(tmp_path / "same", seed=1)
    id_a = load_tagger(a).model_id
    make_wd14_folder(tmp_path / "same", seed=2)
    assert load_tagger(a).model_id != id_a
    export_onnx(TinyWd14(len(tag_rows()), 1), a / "model.onnx", 32, free_batch=True)
    assert load_tagger(a).model_id == id_a
