"""Tiny captioner models for tests, built in code (no downloads): a transformers BLIP folder and an
open_clip CLIP folder (open_clip_config.json + weights), both of the real architectures."""
from __future__ import annotations

import json
from pathlib import Path

import torch

BLIP_WORDS = ["a", "picture", "photo", "of", "cat", "dog", "red", "blue", "tree", "house", "sky", "person"]


def make_blip_folder(folder: Path, *, seed: int = 0, safetensors: bool = True) -> Path:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, BlipTextConfig, BlipVisionConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *BLIP_WORDS,
                                *(f"w{i}" for i in range(40))]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=64,
                          bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():  # transformers initialises the vision tower near zero (std 1e-10): captions would
        for name, param in model.vision_model.named_parameters():  # not depend on the image at all
            if param.ndim >= 2 or "embedding" in name:
                param.normal_(0.0, 0.2)
        for name, param in model.text_decoder.named_parameters():  # and let the image steer the words
            if "crossattention" in name and ("value" in name or "output.dense" in name) and name.endswith("weight"):
                param.mul_(20.0)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def make_clip_folder(folder: Path, *, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


LABEL_WORDS = ["red", "green", "blue", "tall", "soft", "dark", "bright", "old", "shiny", "misty", "calm", "wild"]


def write_label_lists(root: Path, words=LABEL_WORDS) -> Path:
    """The interrogator's five list files, each "<list> <word>" per word."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("artists", "flavors", "mediums", "movements", "negative"):
        (root / f"{name}.txt").write_text("\n".join(f"{name[:-1]} {w}" for w in words) + "\n", encoding="utf-8")
    return root
