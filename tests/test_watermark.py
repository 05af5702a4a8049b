"""LAION watermark classifier: the real EfficientNet-B3 + MLP head with random weights, saved the way the
repo ships it; scores against an independent torchvision pipeline, index-0 semantics, cache, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.errors import AlchemyError

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from extensions_lib.watermark.model import build_model

    torch.manual_seed(0)
    model = build_model()
    folder = tmp_path_factory.mktemp("wm")
    torch.save(model.state_dict(), folder / "watermark_model_v1.pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bias, name in (([4.0, -4.0], "always.pt"), ([-4.0, 4.0], "never.pt")):
        state["classifier.5.weight"].zero_()
        state["classifier.5.bias"].copy_(torch.tensor(bias))
        torch.save(state, folder / name)
    return folder


def picture(seed=0, size=(300, 200)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_head_layout_matches_the_laion_checkpoint():
    from extensions_lib.watermark.model import build_model

    state = build_model().state_dict()
    assert tuple(state["classifier.0.weight"].shape) == (625, 1536)
    assert tuple(state["classifier.3.weight"].shape) == (256, 625)
    assert tuple(state["classifier.5.weight"].shape) == (2, 256)
    assert 11_000_000 < sum(v.numel() for k, v in state.items() if "num_batches" not in k and "running" not in k) < 12_500_000


def test_score_equals_an_independent_torchvision_pipeline(weights):
    import torchvision.transforms as T

    from extensions_lib.watermark.model import WatermarkClassifier, build_model

    ours = WatermarkClassifier(weights / "watermark_model_v1.pt", device="cpu")
    image = picture()
    score, parts = ours.score(image)
    reference = build_model()
    reference.load_state_dict(torch.load(weights / "watermark_model_v1.pt", weights_only=True))
    transform = T.Compose([T.Resize((256, 256)), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        expected = torch.softmax(reference.eval()(transform(image)[None]), dim=1)[0, 0].item()
    assert score == pytest.approx(expected, abs=1e-4) and parts == [score]


def test_index_zero_is_the_watermark_probability(weights):
    from extensions_lib.watermark.model import WatermarkClassifier

    assert WatermarkClassifier(weights / "always.pt", device="cpu").score(picture())[0] > 0.99
    assert WatermarkClassifier(weights / "never.pt", device="cpu").score(picture())[0] < 0.01


def test_corners_take_the_maximum(weights):
    from extensions_lib.watermark.model import WatermarkClassifier, corner_crops

    crops = corner_crops(picture(size=(100, 60)))
    assert [c.size for c in crops] == [(50, 30)] * 4
    clf = WatermarkClassifier(weights / "watermark_model_v1.pt", device="cpu")
    score, parts = clf.score(picture(1), corners=True)
    assert len(parts) == 5 and score == max(parts)


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    from extensions_lib.watermark.model import WatermarkClassifier

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(AlchemyError, match="not the LAION watermark classifier"):
        WatermarkClassifier(tmp_path / "other.pt", device="cpu")
    with pytest.raises(AlchemyError, match="not found"):
        WatermarkClassifier(tmp_path / "missing.pt")


def test_command_flags_moves_and_caches(weights, tmp_path, capsys, monkeypatch):
    from extensions_lib.cli import main
    from extensions_lib.watermark.model import WatermarkClassifier

    ds = tmp_path / "ds"
    ds.mkdir()
    picture(0).save(ds / "a.png")
    (ds / "a.txt").write_text("caption a")
    cache = tmp_path / "cache"
    args = ["watermark", str(ds), "--model", str(weights / "always.pt"), "--cache-dir", str(cache)]
    assert main(args + ["--action", "move", "--move-to", str(tmp_path / "aside")]) == 0
    assert "1 scored >= 0.5" in capsys.readouterr().out
    assert (tmp_path / "aside" / "a.txt").read_text() == "caption a" and not (ds / "a.png").exists()
    (tmp_path / "aside" / "a.png").rename(ds / "a.png")
    calls = []
    real = WatermarkClassifier.score
    monkeypatch.setattr(WatermarkClassifier, "score", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(args + ["--threshold", "0.9999"]) == 0  # another threshold: from the cache, no model call
    assert calls == []
    record = json.loads((ds / "watermarks.jsonl").read_text())
    assert record["image"] == "a.png" and record["watermark"] > 0.99 and record["flagged"] is False


def test_preprocess_skips_what_the_check_flagged(weights, tmp_path):
    from extensions_lib.cli import main
    from extensions_lib.preprocess.options import PreprocessOptions
    from extensions_lib.preprocess.run import preprocess_directory

    src = tmp_path / "src"
    src.mkdir()
    picture(0).save(src / "a.png")
    picture(1).save(src / "b.png")
    (src / "watermarks.jsonl").write_text('{"image": "b.png", "watermark": 0.9, "flagged": true}\nnot json\n'
                                          '{"image": "a.png", "watermark": 0.1, "flagged": false}\n')
    summary = preprocess_directory(src, tmp_path / "out", PreprocessOptions(width=64, height=64, skip_flagged=True))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000-0-a.png"]
    assert ("b.png", "flagged in watermarks.jsonl") in summary.skipped
    # written by the real command: everything flagged with the always-watermark weights
    assert main(["watermark", str(src), "--model", str(weights / "always.pt"), "--no-cache"]) == 0
    summary = preprocess_directory(src, tmp_path / "out2", PreprocessOptions(width=64, height=64, skip_flagged=True))
    assert not list((tmp_path / "out2").glob("*.png")) and len(summary.skipped) == 2
