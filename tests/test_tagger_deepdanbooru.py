"""DeepDanbooru torch port: the WebUI's layout, an independent forward pass, checkpoint loading."""
from __future__ import annotations

import gc
import math
import pickle
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extensions_lib.errors import AlchemyError
from extensions_lib.tagger import CaptionOptions, load_tagger, predict_images, render_caption
from extensions_lib.tagger.deepdanbooru import DeepDanbooruNet, DeepDanbooruTagger, load_deepdanbooru
from extensions_lib.tagger.labels import GENERAL, RATING
from tagger_models import DD_TAGS, make_deepdanbooru_checkpoint, random_image, tiny_deepdanbooru_state


@pytest.fixture(scope="module")
def state():
    return tiny_deepdanbooru_state()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, state):
    root = tmp_path_factory.mktemp("dd")
    return {fmt: make_deepdanbooru_checkpoint(root / fmt, fmt=fmt) for fmt in ("pt", "safetensors")}


def test_full_size_layout_matches_the_webui_port():
    with torch.device("meta"):
        net = DeepDanbooruNet()
    convs = {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert list(convs) == [f"n_Conv_{i}" for i in range(179)]
    # (out, in, kernel, stride) of convolutions named in the WebUI's deepbooru_model.py
    facts = {0: (64, 3, 7, 2), 1: (256, 64, 1, 1), 3: (64, 64, 3, 1), 11: (512, 256, 1, 2), 13: (128, 128, 3, 2),
             36: (1024, 512, 1, 2), 38: (256, 256, 3, 2), 97: (256, 1024, 1, 1), 98: (256, 256, 3, 2),
             99: (1024, 256, 1, 1), 100: (1024, 1024, 1, 2), 157: (1024, 256, 1, 1), 158: (2048, 1024, 1, 2),
             160: (512, 512, 3, 2), 168: (4096, 2048, 1, 2), 170: (1024, 1024, 3, 2), 177: (4096, 1024, 1, 1),
             178: (9176, 4096, 1, 1)}
    for i, (out_c, in_c, k, s) in facts.items():
        conv = convs[f"n_Conv_{i}"]
        assert (conv.out_channels, conv.in_channels, conv.kernel_size[0], conv.stride[0]) == (out_c, in_c, k, s), i
    assert convs["n_Conv_178"].bias is None and all(c.bias is not None for n, c in convs.items() if n != "n_Conv_178")


def _same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'same' padding computed from the general formula (extra pixel at the bottom/right)."""
    pads = []
    for size in (x.shape[3], x.shape[2]):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _reference_forward(state: dict, x_nhwc: torch.Tensor) -> torch.Tensor:
    """resnet_custom_v3 from the written-out facts, with functional convs and formula padding."""
    def conv(i, x, stride=1):
        w = state[f"n_Conv_{i}.weight"]
        if w.shape[-1] > 1:
            x = _same_pad(x, w.shape[-1], stride)
        return F.conv2d(x, w, state.get(f"n_Conv_{i}.bias"), stride=stride)

    x = F.relu(conv(0, x_nhwc.permute(0, 3, 1, 2), 2))
    x = F.max_pool2d(_same_pad(x, 3, 2, float("-inf")), 3, 2)
    i = 1
    for stage, repeats in enumerate((2, 7, 19, 19, 2, 2)):
        stride = 1 if stage == 0 else 2
        if stage == 3:  # this stage's projection shortcut is numbered after its main branch
            main, shortcut = (i, i + 1, i + 2), i + 3
        else:
            main, shortcut = (i + 1, i + 2, i + 3), i
        h = conv(main[2], F.relu(conv(main[1], F.relu(conv(main[0], x)), stride)))
        x = F.relu(h + conv(shortcut, x, stride))
        i += 4
        for _ in range(repeats):
            h = conv(i + 2, F.relu(conv(i + 1, F.relu(conv(i, x)))))
            x = F.relu(h + x)
            i += 3
    return torch.sigmoid(conv(i, x).mean(dim=(2, 3)))


def test_forward_matches_an_independent_implementation(state):
    net = DeepDanbooruNet(len(DD_TAGS), 4, (8, 8, 16, 16, 16, 32))
    net.load_state_dict(state)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(np.stack([np.asarray(random_image(rng, 128, 128), np.float32) / 255 for _ in range(2)]))
    with torch.no_grad():
        ours, reference = net(x), _reference_forward(state, x)
    assert ours.shape == (2, len(DD_TAGS))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert (ours.max() - ours.min()) > 0.2, "tiny weights should give scores that differ"


def test_pt_and_safetensors_checkpoints_load_the_same(checkpoints, state):
    pt = load_deepdanbooru(checkpoints["pt"])
    st = load_deepdanbooru(checkpoints["safetensors"])
    assert pt.tags == list(DD_TAGS) == st.tags
    for name, value in state.items():
        assert torch.equal(pt.state_dict()[name], value) and torch.equal(st.state_dict()[name], value)


def test_tagger_labels_batching_and_captions(checkpoints):
    tagger = load_tagger(checkpoints["pt"].parent)
    assert isinstance(tagger, DeepDanbooruTagger) and tagger.input_size == 512 and tagger.fixed_batch is None
    cats = dict(zip(tagger.labels.names, tagger.labels.categories.tolist()))
    assert cats["rating:safe"] == RATING and cats["1girl"] == GENERAL
    rng = np.random.default_rng(4)
    images = [random_image(rng, w, h) for w, h in ((300, 200), (200, 300), (256, 256))]
    batched = predict_images(tagger, images, batch_size=3)
    single = np.concatenate([predict_images(tagger, [im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    opts = CaptionOptions(rating="first")
    texts = [render_caption(r, tagger.labels, opts, tagger.default_thresholds) for r in batched]
    assert texts == [render_caption(r, tagger.labels, opts, tagger.default_thresholds) for r in single]
    assert all(t.startswith("rating:") for t in texts)


def test_unload_frees_the_network(checkpoints):
    tagger = load_tagger(checkpoints["safetensors"].parent)
    ref = weakref.ref(tagger.model)
    tagger.unload()
    gc.collect()
    assert ref() is None


def test_checkpoint_problems_are_clear_errors(tmp_path, state):
    no_tags = tmp_path / "no_tags"
    no_tags.mkdir()
    torch.save(state, no_tags / "model.pt")
    with pytest.raises(AlchemyError, match="tag list"):
        load_deepdanbooru(no_tags / "model.pt")
    (no_tags / "tags.txt").write_text("\n".join(DD_TAGS[:-1]), encoding="utf-8")
    with pytest.raises(AlchemyError, match="outputs"):
        load_deepdanbooru(no_tags / "model.pt")
    (no_tags / "tags.txt").write_text("\n".join(DD_TAGS), encoding="utf-8")
    assert load_deepdanbooru(no_tags / "model.pt").tags == list(DD_TAGS)

    broken = dict(state)
    del broken["n_Conv_50.weight"]
    torch.save({**broken, "tags": DD_TAGS}, tmp_path / "broken.pt")
    with pytest.raises(AlchemyError, match="resnet_custom_v3"):
        load_deepdanbooru(tmp_path / "broken.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"tags": ["a"], "x": _Evil()}, fh)
    with pytest.raises(AlchemyError) as err:
        load_deepdanbooru(path)
    assert str(path) in err.value.message
    assert "this must never run" not in capsys.readouterr().out
