"""CLIP-interrogator prompts on open_clip: rank label tables against an image, in four modes.

The modes are clip-interrogator 0.6's (classic / fast / best / negative, see `InterrogateOptions`), with
three deliberate differences: ranking is exact (each chunk of `chunk_size` labels keeps its own top k,
then the survivors are re-ranked, so no candidate is lost to an unlucky chunk split) and batched over
images; every prompt stays inside the CLIP token budget (a candidate that would overflow it is not
taken, instead of the chain stopping late); and the negative chain compares negated similarities
throughout. Image features are computed once per image and cached by the caller; the label tables
come from `labels.build_table`'s cache files.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import AlchemyError
from ..weights_file import read_state_dict
from .base import pick_device, quick_digest
from .labels import LabelTable, build_table, table_labels
from .options import InterrogateOptions

MERGED = ("artists", "flavors", "mediums", "movements", "trendings")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def token_count(text: str) -> int:
    """CLIP BPE tokens of `text`, without the start and end tokens (75 fit in a 77-token prompt)."""
    return len(_bpe().encode(text))


def truncate_to_fit(text: str, budget: int = 75, separator: str = ", ") -> str:
    """The longest prefix of whole `separator`-parts that fits the token budget."""
    parts = text.split(separator)
    kept = parts[0]
    for part in parts[1:]:
        trial = kept + separator + part
        if token_count(trial) > budget:
            break
        kept = trial
    return kept


# ---- loading -----------------------------------------------------------------------------------

def _state_dict(path: Path) -> dict:
    return read_state_dict(path, "not a CLIP state dict", "pass open_clip weights (.safetensors/.bin/.pt)")


def _openai_jit(path: Path):
    """OpenAI's ViT-L-14.pt is a TorchScript archive: read its weights with torch.jit (which runs no
    Python pickle) and rebuild open_clip's model from them."""
    import torch
    from open_clip.model import build_model_from_openai_state_dict

    try:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        return None
    return build_model_from_openai_state_dict(state)


def load_clip_model(name: str, path: Path):
    """(model, mean, std, tokenizer arch) for open_clip model `name` ('ARCH/TAG') from `path`."""
    import open_clip

    arch = name.split("/")[0]
    mean, std = OPENAI_MEAN, OPENAI_STD
    if path.is_dir():
        config_file = path / "open_clip_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
            model_cfg = dict(config["model_cfg"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AlchemyError(f"open_clip_config.json unreadable ({exc})", config_file,
                               "an open_clip folder needs open_clip_config.json with model_cfg") from None
        pre = config.get("preprocess_cfg") or {}
        mean, std = tuple(pre.get("mean", mean)), tuple(pre.get("std", std))
        weights = next((path / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                                            "model.safetensors") if (path / f).is_file()), None)
        if weights is None:
            raise AlchemyError("no weights in the open_clip folder", path,
                               "add open_clip_model.safetensors or open_clip_pytorch_model.bin")
        model = open_clip.CLIP(**model_cfg)
        state = _state_dict(weights)
    else:
        model = _openai_jit(path) if path.suffix == ".pt" else None
        if model is not None:
            return model.float(), mean, std, arch, path
        state = _state_dict(path)
        weights = path
        if open_clip.get_model_config(arch) is None:
            raise AlchemyError(f"unknown open_clip architecture {arch!r}", path,
                               "name it with --clip-model ARCH/TAG (e.g. ViT-L-14/openai)")
        model = open_clip.create_model(arch, pretrained=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AlchemyError(f"weights do not fit {arch} ({str(exc).splitlines()[0]})", weights,
                           "pick the --clip-model the weights belong to") from None
    return model.float(), mean, std, arch, weights


class ClipInterrogator:
    """A loaded CLIP model with its label tables (built on first use, from the cache files when present)."""

    kind = "clip"

    def __init__(self, name: str, path: str | os.PathLike, *, device: str = "auto",
                 report: Callable[[str], None] | None = None):
        import open_clip
        import torch

        self.name = name
        self.device = pick_device(device)
        self.on_gpu = self.device.startswith("cuda")
        model, mean, std, arch, weights = load_clip_model(name, Path(path))
        self.model = model.to(self.device).eval()
        if self.on_gpu:
            self.model = self.model.half()
        size = self.model.visual.image_size
        self.preprocess = open_clip.image_transform(size if isinstance(size, int) else size[0], is_train=False,
                                                    mean=mean, std=std)
        self.context_length = int(getattr(self.model, "context_length", 77))
        self.dim = int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else None
        self.model_id = f"clip-{name.replace('/', '_')}-{quick_digest([weights])}"
        self._tables: dict[str, LabelTable] = {}
        self._torch = torch
        if report:
            report(f"loaded CLIP {name} on {self.device}")

    # --- encoders --------------------------------------------------------------------------------
    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-length image embeddings, (len(images), dim) float32."""
        torch = self._torch
        if not images:
            return np.zeros((0, self.dim or 0), np.float32)
        batch = torch.stack([self.preprocess(im if im.mode == "RGB" else im.convert("RGB")) for im in images])
        with torch.inference_mode():
            feats = self.model.encode_image(batch.to(self.device, next(self.model.parameters()).dtype)).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length text embeddings, (len(texts), dim) float32."""
        import open_clip

        torch = self._torch
        tokens = open_clip.tokenize(list(texts), context_length=self.context_length).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def tables(self, *, lists_dir=None, cache_dir=None, chunk_size: int = 2048, names: Sequence[str] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, LabelTable]:
        wanted = names or ("artists", "flavors", "mediums", "movements", "trendings", "negative")
        missing = [n for n in wanted if n not in self._tables]
        if missing:
            labels = table_labels(lists_dir)
            for name in missing:
                step = (lambda done, total, n=name: progress(n, done, total)) if progress else None
                self._tables[name] = build_table(name, labels[name], self.encode_text, cache_dir=cache_dir,
                                                 clip_name=self.name, dim=self.dim, chunk_size=chunk_size,
                                                 progress=step)
        return {n: self._tables[n] for n in wanted}

    def unload(self) -> None:
        self.model = None
        self._tables.clear()
        if self.on_gpu:
            self._torch.cuda.empty_cache()


def load_clip(path: str | os.PathLike, *, name: str, device: str = "auto", report=None) -> ClipInterrogator:
    return ClipInterrogator(name, path, device=device, report=report)


# ---- ranking -----------------------------------------------------------------------------------

def top_k(features: np.ndarray, embeds: np.ndarray, k: int, *, chunk_size: int = 2048,
          reverse: bool = False) -> np.ndarray:
    """Indices of the k rows of `embeds` most (or, reversed, least) similar to each feature row, best first.

    Exact, with bounded memory: each chunk of labels keeps its own top k, then those are re-ranked.
    """
    features = np.atleast_2d(features)
    n = embeds.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros((features.shape[0], 0), dtype=np.int64)
    sign = -1.0 if reverse else 1.0
    best_idx, best_val = [], []
    for start in range(0, n, chunk_size):
        sims = sign * (features @ embeds[start:start + chunk_size].T)
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        best_idx.append(part + start)
        best_val.append(np.take_along_axis(sims, part, axis=1))
    idx, val = np.concatenate(best_idx, axis=1), np.concatenate(best_val, axis=1)
    order = np.lexsort((idx, -val), axis=1)[:, :k]  # by similarity, ties by label order: deterministic
    return np.take_along_axis(idx, order, axis=1)


class Prompter:
    """The four modes for one image's features, over the tables of a :class:`ClipInterrogator`."""

    def __init__(self, clip: ClipInterrogator, tables: dict[str, LabelTable], options: InterrogateOptions):
        self.clip, self.tables, self.opts = clip, tables, options
        self._merged: LabelTable | None = None

    @property
    def merged(self) -> LabelTable:
        if self._merged is None:
            parts = [self.tables[n] for n in MERGED]
            self._merged = LabelTable("merged", [l for t in parts for l in t.labels],
                                      np.concatenate([t.embeds for t in parts]))
        return self._merged

    def rank(self, table: LabelTable, features: np.ndarray, k: int, reverse: bool = False) -> list[str]:
        idx = top_k(features, table.embeds, k, chunk_size=self.opts.chunk_size, reverse=reverse)[0]
        return [table.labels[i] for i in idx]

    def similarities(self, features: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        step = self.opts.chunk_size
        out = [self.clip.encode_text(texts[i:i + step]) @ features for i in range(0, len(texts), step)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def fit(self, text: str) -> str:
        return truncate_to_fit(text, self.opts.prompt_budget)

    def classic(self, features, caption: str) -> str:
        medium, artist, trending, movement = (self.rank(self.tables[n], features, 1)[0]
                                              for n in ("mediums", "artists", "trendings", "movements"))
        flavors = ", ".join(self.rank(self.tables["flavors"], features, 3))
        if caption and caption.startswith(medium):
            prompt = f"{caption} {artist}, {trending}, {movement}, {flavors}"
        else:
            prompt = ", ".join(p for p in (caption, f"{medium} {artist}", trending, movement, flavors) if p)
        return self.fit(prompt)

    def fast(self, features, caption: str) -> str:
        terms = self.rank(self.merged, features, self.opts.max_flavors)
        return self.fit(", ".join([caption, *terms] if caption else terms))

    def chain(self, features, phrases: Sequence[str], start: str = "", *, min_count: int, max_count: int,
              reverse: bool = False) -> str:
        """Greedily add the phrase that makes the prompt most (reversed: least) similar; keep the best seen."""
        sign = -1.0 if reverse else 1.0
        pool = list(dict.fromkeys(p for p in phrases if p))
        cost = {p: token_count(p) for p in pool}
        budget = self.opts.prompt_budget
        if not start:
            if not pool:
                return ""
            sims = sign * self.similarities(features, pool)
            start = pool[int(np.argmax(sims))]
            pool.remove(start)
        best = current = start
        best_sim = current_sim = sign * float(self.similarities(features, [start])[0])
        used = token_count(current)
        for step in range(max_count):
            fitting = [p for p in pool if used + 1 + cost[p] <= budget]
            if not fitting:
                break
            sims = sign * self.similarities(features, [f"{current}, {p}" for p in fitting])
            pick = int(np.argmax(sims))
            candidate, sim = f"{current}, {fitting[pick]}", float(sims[pick])
            if token_count(candidate) > budget:  # BPE merged across the join: rare, skip that phrase
                pool.remove(fitting[pick])
                continue
            if sim > best_sim:
                best, best_sim = candidate, sim
            if not (sim > current_sim or step < min_count):
                break
            current, current_sim, used = candidate, sim, token_count(candidate)
            pool.remove(fitting[pick])
        return best

    def best(self, features, caption: str) -> str:
        o = self.opts
        candidates = self.rank(self.merged, features, o.intermediate_count)
        chained = self.chain(features, candidates, caption, min_count=o.min_flavors, max_count=o.max_flavors)
        options = [p for p in (caption, self.classic(features, caption), self.fast(features, caption), chained) if p]
        return options[int(np.argmax(self.similarities(features, options)))]

    def negative(self, features, caption: str = "") -> str:
        o = self.opts
        candidates = self.rank(self.tables["flavors"], features, o.intermediate_count, reverse=True)
        candidates += self.tables["negative"].labels
        return self.chain(features, candidates, min_count=o.min_flavors, max_count=o.max_flavors, reverse=True)

    def prompt(self, features: np.ndarray, caption: str = "") -> str:
        return getattr(self, self.opts.mode)(np.asarray(features, np.float32), caption.strip())


def tables_for(mode: str) -> tuple[str, ...]:
    """The tables a mode reads (negative mode needs neither artists nor the 10k-entry merged table)."""
    return ("flavors", "negative") if mode == "negative" else MERGED
