"""CLIP interrogator on a tiny open_clip CLIP: label caches compatible with clip-interrogator's files,
exact chunked ranking, the four modes and the token budget, checked against direct numpy computations."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from captioner_models import make_clip_folder, write_label_lists
from extensions_lib.captioners import InterrogateOptions, Prompter, load_clip, token_count, top_k
from extensions_lib.captioners.labels import build_table, cache_file, table_labels

WORDS = ["red", "green", "blue", "tall", "soft", "dark", "bright", "old", "shiny", "misty", "calm", "wild"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = make_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")
    return load_clip(folder, name="tiny/test", device="cpu")


@pytest.fixture()
def lists_dir(tmp_path):
    return write_label_lists(tmp_path / "lists", WORDS)


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 36, 3)) * 255).astype(np.uint8))


def ci_cache_bytes(path, labels, embeds):
    """How clip-interrogator 0.6 writes a cache file (restated): fp16 embeds + sha256 hex as int8."""
    from safetensors.numpy import save_file

    digest = hashlib.sha256(",".join(labels).encode()).hexdigest()
    save_file({"embeds": embeds.astype(np.float16), "hash": np.array([ord(c) for c in digest], dtype=np.int8)},
              str(path))


def test_shipped_lists_build_clip_interrogators_tables():
    tables = table_labels()
    raw_artists = (tables["artists"][0], tables["artists"][len(tables["artists"]) // 2])
    assert raw_artists[0].startswith("by ") and raw_artists[1].startswith("inspired by ")
    assert len(tables["artists"]) == 2 * 5265 and len(tables["flavors"]) == 100970
    assert len(tables["mediums"]) == 95 and len(tables["movements"]) == 200 and len(tables["negative"]) == 41  # no final newline: 40 by wc -l
    assert len(tables["trendings"]) == 72 and "trending on dribble" in tables["trendings"]


def test_existing_cache_file_is_used_and_ours_reads_like_clip_interrogators(tmp_path, clip):
    labels = ["a cat", "a dog", "a tree"]
    embeds = np.eye(3, clip.dim, dtype=np.float32)
    ci_cache_bytes(cache_file(tmp_path, "tiny/test", "flavors"), labels, embeds)
    assert cache_file(tmp_path, "ViT-L-14/openai", "flavors").name == "ViT-L-14_openai_flavors.safetensors"

    def never(texts):
        raise AssertionError("a matching cache file must not be recomputed")

    table = build_table("flavors", labels, never, cache_dir=tmp_path, clip_name="tiny/test", dim=clip.dim)
    np.testing.assert_array_equal(table.embeds, embeds)

    changed = labels + ["a house"]  # the hash no longer matches: recompute and rewrite
    table = build_table("flavors", changed, clip.encode_text, cache_dir=tmp_path, clip_name="tiny/test",
                        dim=clip.dim, chunk_size=2)
    expected = clip.encode_text(changed).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(table.embeds, expected, atol=1e-3)  # fp16 steps; chunking changes float noise
    from safetensors.numpy import load_file

    stored = load_file(str(cache_file(tmp_path, "tiny/test", "flavors")))  # clip-interrogator's reading rule
    digest = hashlib.sha256(",".join(changed).encode()).hexdigest()
    assert np.array_equal(stored["hash"], np.array([ord(c) for c in digest], dtype=np.int8))
    assert stored["embeds"].dtype == np.float16 and stored["embeds"].shape == (4, clip.dim)

    cache_file(tmp_path, "tiny/test", "flavors").write_bytes(b"damaged")
    again = build_table("flavors", changed, clip.encode_text, cache_dir=tmp_path, clip_name="tiny/test", dim=clip.dim)
    np.testing.assert_array_equal(again.embeds, expected)


@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_top_k_is_exact(reverse):
    rng = np.random.default_rng(1)
    feats, embeds = rng.normal(size=(3, 8)), rng.normal(size=(1000, 8))
    got = top_k(feats, embeds, 17, chunk_size=64, reverse=reverse)
    sims = feats @ embeds.T
    expected = np.argsort(sims if reverse else -sims, axis=1, kind="stable")[:, :17]
    np.testing.assert_array_equal(got, expected)


def test_modes_against_direct_ranking(clip, lists_dir, tmp_path):
    opts = InterrogateOptions(max_flavors=5, min_flavors=2, intermediate_count=20, chunk_size=7)
    tables = clip.tables(lists_dir=lists_dir, cache_dir=tmp_path)
    feats = clip.image_features([picture(0)])[0]
    np.testing.assert_allclose(np.linalg.norm(feats), 1.0, rtol=1e-5)

    def best(name, k=1, reverse=False):
        t = tables[name]
        order = np.argsort((-1 if not reverse else 1) * (t.embeds @ feats), kind="stable")
        return [t.labels[i] for i in order[:k]]

    p = Prompter(clip, tables, opts)
    merged_labels = [l for n in ("artists", "flavors", "mediums", "movements", "trendings") for l in tables[n].labels]
    merged = np.concatenate([tables[n].embeds for n in ("artists", "flavors", "mediums", "movements", "trendings")])
    top = [merged_labels[i] for i in np.argsort(-(merged @ feats), kind="stable")[:5]]
    assert p.prompt(feats, "a photo") == "a photo, " + ", ".join(top)

    classic = Prompter(clip, tables, InterrogateOptions(mode="classic")).prompt(feats, "a photo")
    assert classic == (f"a photo, {best('mediums')[0]} {best('artists')[0]}, {best('trendings')[0]}, "
                       f"{best('movements')[0]}, " + ", ".join(best("flavors", 3)))

    best_prompt = Prompter(clip, tables, InterrogateOptions(mode="best", max_flavors=4, min_flavors=1,
                                                            intermediate_count=10)).prompt(feats, "a photo")
    assert best_prompt.startswith("a photo")
    negative = Prompter(clip, tables, InterrogateOptions(mode="negative", max_flavors=3, min_flavors=1,
                                                         intermediate_count=6)).prompt(feats)
    pool = set(best("flavors", 6, reverse=True)) | set(tables["negative"].labels)
    assert negative and all(term in pool for term in negative.split(", "))


def test_prompts_stay_inside_the_token_budget(clip, tmp_path):
    root = write_label_lists(tmp_path / "long", [" ".join(f"{w}{i}" for i in range(6)) for w in WORDS])
    tables = clip.tables(lists_dir=root, cache_dir=None)
    clip._tables.clear()
    feats = clip.image_features([picture(1)])[0]
    for mode in ("classic", "fast", "best", "negative"):
        opts = InterrogateOptions(mode=mode, prompt_budget=30, max_flavors=20, min_flavors=20, intermediate_count=30)
        prompt = Prompter(clip, tables, opts).prompt(feats, "a photo of things")
        assert 0 < token_count(prompt) <= 30, (mode, prompt)
