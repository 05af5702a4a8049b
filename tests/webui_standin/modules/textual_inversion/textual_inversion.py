"""Stand-in for ``modules/textual_inversion/textual_inversion.py``: ``Embedding`` and ``EmbeddingDatabase``.

Files are read with ``extensions_lib.formats.embedding.read_embedding`` (a test double for the host's own
readers, which accept the same forms); the database logic (directories, mtime-gated reloads that wipe
programmatic registrations, token-level lookup longest first, the width check) follows the host.
"""
from __future__ import annotations

import hashlib
import os

import torch

from modules import devices, shared


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename = None
        self.hash = None
        self.shorthash = None

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]


class DirWithTextualInversionEmbeddings:
    def __init__(self, path):
        self.path = path
        self.mtime = None

    def has_changed(self):
        if not os.path.isdir(self.path):
            return False
        mt = os.path.getmtime(self.path)
        if self.mtime is None or mt > self.mtime:
            return True

    def update(self):
        if not os.path.isdir(self.path):
            return
        self.mtime = os.path.getmtime(self.path)


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}
        self.previously_displayed_embeddings = ()
        self.load_count = 0

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def add_embedding_dir_from_opts(self):
        if shared.cmd_opts.embeddings_dir and shared.cmd_opts.embeddings_dir not in self.embedding_dirs:
            self.add_embedding_dir(shared.cmd_opts.embeddings_dir)

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        if first_id not in self.ids_lookup:
            self.ids_lookup[first_id] = []
        if name in self.word_embeddings:
            lookup = [x for x in self.ids_lookup[first_id] if x[1].name != name]
        else:
            lookup = self.ids_lookup[first_id]
        if embedding is not None:
            lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            if name in self.word_embeddings:
                del self.word_embeddings[name]
            if len(self.ids_lookup[first_id]) == 0:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def get_expected_shape(self):
        vec = shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1)
        return vec.shape[1]

    def load_from_file(self, path, filename):
        from extensions_lib.errors import AlchemyError
        from extensions_lib.formats.embedding import read_embedding

        name, ext = os.path.splitext(filename)
        if ext.upper() not in ['.PNG', '.WEBP', '.JXL', '.AVIF', '.BIN', '.PT', '.SAFETENSORS']:
            return
        if name.endswith(".preview"):
            return
        try:
            data = read_embedding(path)
        except AlchemyError:
            return
        vec = data.vectors
        if isinstance(vec, dict):
            vec = {k: v.detach().to(devices.device, dtype=torch.float32) for k, v in vec.items()}
            shape, vectors = sum(v.shape[-1] for v in vec.values()), vec["clip_g"].shape[0]
        else:
            vec = vec.detach().to(devices.device, dtype=torch.float32)
            shape, vectors = vec.shape[-1], vec.shape[0]
        embedding = Embedding(vec, data.name if ext.upper() in ('.PNG', '.WEBP') and data.name else name, data.step)
        embedding.vectors, embedding.shape = vectors, shape
        embedding.sd_checkpoint, embedding.sd_checkpoint_name = data.sd_checkpoint, data.sd_checkpoint_name
        embedding.filename = path
        with open(path, "rb") as fh:
            embedding.set_hash(hashlib.sha256(fh.read()).hexdigest())
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_from_dir(self, embdir):
        if not os.path.isdir(embdir.path):
            return
        for root, _, fns in os.walk(embdir.path, followlinks=True):
            for fn in fns:
                fullfn = os.path.join(root, fn)
                if os.stat(fullfn).st_size == 0:
                    continue
                self.load_from_file(fullfn, fn)

    def load_textual_inversion_embeddings(self, force_reload=False):
        if not force_reload:
            need_reload = False
            for embdir in self.embedding_dirs.values():
                if embdir.has_changed():
                    need_reload = True
                    break
            if not need_reload:
                return
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for embdir in self.embedding_dirs.values():
            self.load_from_dir(embdir)
            embdir.update()
        sorted_word_embeddings = {e.name: e for e in sorted(self.word_embeddings.values(), key=lambda e: e.name.lower())}
        self.word_embeddings.clear()
        self.word_embeddings.update(sorted_word_embeddings)
        self.load_count += 1

    def find_embedding_at_position(self, tokens, offset):
        token = tokens[offset]
        possible_matches = self.ids_lookup.get(token, None)
        if possible_matches is None:
            return None, None
        for ids, embedding in possible_matches:
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
