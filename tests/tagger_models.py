"""Tiny tagger models for tests, built in code (no downloads).

- :func:`make_wd14_folder`: a WD14-style folder: `model.onnx` exported from a small torch network
  (NHWC float BGR 0-255 input, sigmoid outputs; batch dimension free or fixed at 1) and a
  `selected_tags.csv` with CSV quoting and all three categories (9 rating, 0 general, 4 character).
- :func:`make_deepdanbooru_checkpoint`: a resnet_custom_v3 state dict with narrow channels and its
  tag list, saved as the WebUI's `.pt` (tags inside) or as `.safetensors` (tags in the metadata).
"""
from __future__ import annotations

import csv
import inspect
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

RATINGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL_TAGS = ["1girl", "solo", "long_hair", "smile", "^_^", ">_<", "open_mouth", 'don\'t_say_"lazy"',
                "hello,_world", "looking_at_viewer", "short_hair", "blue_eyes", "(o)_(o)", "simple_background",
                "white_background", "holding", "sword", "flower"]
CHARACTER_TAGS = ["hatsune_miku_(vocaloid)", "hakurei_reimu", "kirisame_marisa", "c.c."]


def tag_rows() -> list[tuple[str, int]]:
    return [(n, 9) for n in RATINGS] + [(n, 0) for n in GENERAL_TAGS] + [(n, 4) for n in CHARACTER_TAGS]


def write_selected_tags(path: Path, rows: list[tuple[str, int]] | None = None) -> Path:
    rows = rows if rows is not None else tag_rows()
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(rows):
            tag_id = 9999999 - i if cat == 9 else 1000 + i
            writer.writerow([tag_id, name, cat, 10000 - i])
    return path


class TinyWd14(nn.Module):
    """NHWC BGR 0-255 -> sigmoid scores; logits spread wide so thresholds have something to cut."""

    def __init__(self, n_tags: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(32, n_tags)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.head.weight.mul_(1.5)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
        x = torch.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return torch.sigmoid(self.head(pooled))


def export_onnx(module: nn.Module, path: Path, size: int, *, free_batch: bool, input_name: str = "input_1",
                output_name: str = "predictions_sigmoid") -> Path:
    """torch -> ONNX with the legacy exporter (available on torch 2.1 and current torch)."""
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    dynamic = {input_name: {0: "batch"}, output_name: {0: "batch"}} if free_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.rand(1, size, size, 3) * 255,), buf, input_names=[input_name],
                          output_names=[output_name], dynamic_axes=dynamic, opset_version=17, **kwargs)
    path.write_bytes(buf.getvalue())
    return path


def make_wd14_folder(folder: Path, *, size: int = 32, free_batch: bool = True, seed: int = 0,
                     rows: list[tuple[str, int]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else tag_rows()
    write_selected_tags(folder / "selected_tags.csv", rows)
    export_onnx(TinyWd14(len(rows), seed), folder / "model.onnx", size, free_batch=free_batch)
    return folder


# ---- DeepDanbooru -----------------------------------------------------------------------------

DD_TAGS = ["1girl", "solo", "long_hair", "smile", "blush", "rating:safe", "rating:questionable",
           "rating:explicit", "hatsune_miku", "open_mouth"]
TINY_DD_WIDTHS = (8, 8, 16, 16, 16, 32)
TINY_DD_STEM = 4


def tiny_deepdanbooru_state(tags=DD_TAGS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Narrow resnet_custom_v3 weights whose scores vary from image to image.

    He-normal convs; the bias-free head is then fitted on a few calibration images: projected
    orthogonal to their mean feature (so logits centre on 0) and scaled to a spread of about 2.
    """
    from extensions_lib.tagger.deepdanbooru import DeepDanbooruNet, head_index

    g = torch.Generator().manual_seed(seed)
    net = DeepDanbooruNet(len(tags), TINY_DD_STEM, TINY_DD_WIDTHS).eval()
    head = net.conv(head_index(net.plan))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        rng = np.random.default_rng(seed)
        x = torch.stack([torch.from_numpy(np.asarray(random_image(rng, 512, 512), dtype=np.float32) / 255)
                         for _ in range(4)])
        feats = _pre_head_features(net, x)
        mean = feats.mean(0)
        w = head.weight.flatten(1)
        w = w - (w @ mean)[:, None] * mean[None, :] / mean.dot(mean)
        spread = (feats - mean) @ w.T
        w = w * (2.0 / spread.std(0).clamp_min(1e-6))[:, None]
        head.weight.copy_(w.reshape(head.weight.shape))
    return {k: v.clone() for k, v in net.state_dict().items()}


def _pre_head_features(net, x: torch.Tensor) -> torch.Tensor:
    """Globally pooled activations that feed the head conv (captured with a forward hook)."""
    from extensions_lib.tagger.deepdanbooru import head_index

    captured = []
    hook = net.conv(head_index(net.plan)).register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        net(x)
    finally:
        hook.remove()
    return captured[0].mean(dim=(2, 3))


def make_deepdanbooru_checkpoint(folder: Path, *, fmt: str = "pt", tags=DD_TAGS, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_deepdanbooru_state(tags, seed)
    if fmt == "pt":
        path = folder / "model-resnet_custom_v3.pt"
        torch.save({**state, "tags": list(tags)}, path)
    else:
        from safetensors.torch import save_file

        path = folder / "model-resnet_custom_v3.safetensors"
        save_file(state, str(path), metadata={"tags": json.dumps(list(tags))})
    return path


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB"):
    from PIL import Image

    # Coarse random colour fields, smoothly upscaled: images differ a lot in what the tiny nets see.
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    coarse = rng.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
    small = Image.fromarray(coarse[:, :, 0] if channels == 1 else coarse, mode)
    return small.resize((width, height), Image.BILINEAR)
