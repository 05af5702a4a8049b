"""Stand-in for ``modules/sd_hijack_open_clip.py``: the SD2 prompt wrapper (open_clip tokenizer, pad 0)."""
from __future__ import annotations

import open_clip.tokenizer
import torch

from modules import devices, sd_hijack_clip

tokenizer = open_clip.tokenizer._tokenizer


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.comma_token = [v for k, v in tokenizer.encoder.items() if k == ',</w>'][0]
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = tokenizer.encode(init_text)
        ids = torch.asarray([ids], device=devices.device, dtype=torch.int)
        return self.wrapped.model.token_embedding.wrapped(ids).squeeze(0)
