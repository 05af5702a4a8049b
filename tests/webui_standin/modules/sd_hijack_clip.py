"""Stand-in for ``modules/sd_hijack_clip.py``: the prompt wrapper the host puts around the text encoder.

Prompt parsing, chunking (75-token chunks, BREAK, comma backtrack, embedding fixes), ``hijack.fixes`` per
chunk batch and emphasis are the host's own rules as restated in ``tests/host_prompt_reference.py``, which
is independent of ``extensions_lib.prompt`` (tests hold that against this).
"""
from __future__ import annotations

import os
import sys

import torch

from modules import shared

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from host_prompt_reference import HostPromptWrapper  # noqa: E402
sys.path.pop(0)


class TextConditionalModel(HostPromptWrapper, torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hijack = None
        self.is_trainable = False
        self.input_key = 'txt'
        self.return_pooled = False
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def host_opts(self):
        return shared.opts

    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def encode_embedding_init_text(self, init_text, nvpt):
        raise NotImplementedError


class FrozenCLIPEmbedderWithCustomWords(TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)
        self.id_start = self.wrapped.tokenizer.bos_token_id
        self.id_end = self.wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-shared.opts.CLIP_stop_at_last_layers)
        if shared.opts.CLIP_stop_at_last_layers > 1:
            z = outputs.hidden_states[-shared.opts.CLIP_stop_at_last_layers]
            z = self.wrapped.transformer.text_model.final_layer_norm(z)
        else:
            z = outputs.last_hidden_state
        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        embedding_layer = self.wrapped.transformer.text_model.embeddings
        ids = self.wrapped.tokenizer(init_text, max_length=nvpt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return embedding_layer.token_embedding.wrapped(ids.to(embedding_layer.token_embedding.wrapped.weight.device)).squeeze(0)
