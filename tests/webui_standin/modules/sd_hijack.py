"""Stand-in for ``modules/sd_hijack.py``: ``model_hijack`` (with ``embedding_db``) and ``EmbeddingsWithFixes``."""
from __future__ import annotations

import torch

from modules import devices, sd_hijack_clip, sd_hijack_open_clip
from modules.textual_inversion.textual_inversion import EmbeddingDatabase


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key='clip_l'):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if batch_fixes is None or len(batch_fixes) == 0 or max([len(x) for x in batch_fixes]) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = devices.cond_cast_unet(vec)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]]).to(
                    dtype=inputs_embeds.dtype)
            vecs.append(tensor)
        return torch.stack(vecs)


def apply_optimizations(option=None):
    return ""


def undo_optimizations():
    pass


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()

    def hijack(self, m):
        if hasattr(m.cond_stage_model, "model"):
            m.cond_stage_model.model.token_embedding = EmbeddingsWithFixes(m.cond_stage_model.model.token_embedding, self)
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        else:
            model_embeddings = m.cond_stage_model.transformer.text_model.embeddings
            model_embeddings.token_embedding = EmbeddingsWithFixes(model_embeddings.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model
        self.embedding_db.add_embedding_dir_from_opts()

    def undo_hijack(self, m):
        if isinstance(m.cond_stage_model, sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords):
            m.cond_stage_model = m.cond_stage_model.wrapped
            if isinstance(m.cond_stage_model.model.token_embedding, EmbeddingsWithFixes):
                m.cond_stage_model.model.token_embedding = m.cond_stage_model.model.token_embedding.wrapped
        elif isinstance(m.cond_stage_model, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords):
            m.cond_stage_model = m.cond_stage_model.wrapped
            model_embeddings = m.cond_stage_model.transformer.text_model.embeddings
            if isinstance(model_embeddings.token_embedding, EmbeddingsWithFixes):
                model_embeddings.token_embedding = model_embeddings.token_embedding.wrapped
        self.clip = None

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text):
        _, token_count = self.clip.process_texts([text])
        return token_count, token_count


model_hijack = StableDiffusionModelHijack()
