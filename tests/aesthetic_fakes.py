"""Tiny CLIP models for the aesthetic-gradients tests: the real architectures and file layouts at toy sizes.

- ``make_hf_clip``: a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``), as
  ``openai/clip-vit-large-patch14`` ships; its text width matches the tiny SD1 text encoder (32), so its
  ``text_projection`` fits that tower.
- ``make_open_clip``: an OpenCLIP folder (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` with
  ``visual.*`` and text keys), as ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` ships; embed_dim 32 matches the
  tiny SD2 checkpoint's ``text_projection``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXT_WIDTH = 32
HF_PROJECTION = 16
IMAGE_SIZE = 28
OPEN_CLIP_EMBED = 32


def make_hf_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=TEXT_WIDTH, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=IMAGE_SIZE, patch_size=14),
        projection_dim=HF_PROJECTION)
    CLIPModel(config).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def open_clip_cfg() -> dict:
    return {"embed_dim": OPEN_CLIP_EMBED,
            "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def make_open_clip(folder: Path, seed: int = 0) -> Path:
    import open_clip

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.model.CLIP(**open_clip_cfg())
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_cfg(), "preprocess_cfg": {}}))
    return folder


def make_images(folder: Path, count: int = 5, seed: int = 0, size: tuple[int, int] = (40, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder
