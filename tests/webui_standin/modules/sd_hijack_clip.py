"""Stand-in for ``modules/sd_hijack_clip.py``: the prompt wrapper the host puts around the text encoder.

``forward(texts)`` follows the host: prompts -> 75-token chunks with embedding fixes, ``hijack.fixes`` set
for each chunk batch (``EmbeddingsWithFixes`` reads them), emphasis, chunks concatenated. Chunking is
borrowed from ``extensions_lib.prompt`` (a test double: the real host has its own copy of these rules).
"""
from __future__ import annotations

import torch

from modules import devices, shared


class _DbMatcher:
    """``extensions_lib.prompt``'s matcher interface over the host's ``EmbeddingDatabase``."""

    def __init__(self, db):
        self.db = db

    def find_at(self, tokens, pos):
        embedding, length = self.db.find_embedding_at_position(tokens, pos)
        if embedding is None:
            return None
        return length, embedding.vectors, embedding


class TextConditionalModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hijack = None
        self.chunk_length = 75
        self.is_trainable = False
        self.input_key = 'txt'
        self.return_pooled = False
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def encode_embedding_init_text(self, init_text, nvpt):
        raise NotImplementedError

    def process_texts(self, texts):
        from extensions_lib.prompt import SpecialTokens, chunk_prompt

        ids = SpecialTokens(self.id_start, self.id_end, self.id_pad, self.comma_token)
        matcher = _DbMatcher(self.hijack.embedding_db)
        batch_chunks = [chunk_prompt(self, text, ids, matcher, shared.opts.emphasis, shared.opts.comma_padding_backtrack)
                        for text in texts]
        return batch_chunks, max(len(c) for c in batch_chunks) * self.chunk_length

    def forward(self, texts):
        from extensions_lib.prompt import SpecialTokens, apply_emphasis, even_out_chunks

        batch_chunks, _ = self.process_texts(texts)
        batch_chunks = even_out_chunks(batch_chunks, SpecialTokens(self.id_start, self.id_end, self.id_pad,
                                                                   self.comma_token))
        used_embeddings = {}
        zs = []
        for rows in zip(*batch_chunks):
            self.hijack.fixes = [chunk.fixes for chunk in rows]
            for fixes in self.hijack.fixes:
                for _position, embedding in fixes:
                    used_embeddings[embedding.name] = embedding
            tokens = torch.asarray([chunk.tokens for chunk in rows]).to(devices.device)
            z = self.encode_with_transformers(tokens)
            zs.append(apply_emphasis(z, torch.asarray([chunk.multipliers for chunk in rows]), shared.opts.emphasis))
        if used_embeddings and shared.opts.textual_inversion_add_hashes_to_infotext:
            hashes = [f"{name}: {emb.shorthash}" for name, emb in used_embeddings.items()]
            self.hijack.extra_generation_params["TI hashes"] = ", ".join(hashes)
        return torch.hstack(zs)


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
