"""Offline CLIP tokenizers: same ids as independent implementations, WebUI-specific cleaning, cached files."""
from __future__ import annotations

import json

import pytest

from extensions_lib.backend import tokenizer as tk

LONG = ", ".join(f"detailed word{i} in a long prompt" for i in range(30))
# Prompts on which every implementation agrees (no html entities next to '<', no fullwidth/curly forms).
CORPUS = [
    "a photo of a cat",
    "A PHOTO   of a\n\tCat!!",
    "(masterpiece:1.2), [[worst quality]], (((best))), \\(escaped\\), {curly}",
    "1girl, solo, 1024x768, 3.5 stars, 50% off; #hashtag @user a+b=c",
    "don't stop, it's 'quoted' \"double\"",
    "café naïve résumé über São Paulo",
    "東京タワー 夜景, 고양이, кошка, القطة",
    "emoji 🐱🔥👍🏽 and ✨sparkles✨",
    "embedding-name_v2 style-of-xyz",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def clip(cache_root):
    return tk.make_tokenizer("clip", cache_dir=cache_root)


@pytest.fixture(scope="module")
def open_clip_tok():
    return tk.make_tokenizer("open_clip")


@pytest.fixture(scope="module")
def reference_simple():
    """open_clip's own tokenizer, reading the gzip BPE file directly (no generated files involved)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def generated(cache_root, clip):
    """(vocab.json, merges.txt) as generated for the clip tokenizer."""
    folder = tk.ensure_hf_clip_files(cache_root)
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(scope="module")
def reference_fast(generated):
    """The Rust BPE engine (tokenizers) over the generated files: a second BPE implementation."""
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast(vocab_file=generated[0], merges_file=generated[1])


@pytest.fixture(scope="module")
def reference_hf(generated):
    """transformers' slow CLIPTokenizer over the generated files (reference for the open_clip flavour)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(*generated)


@pytest.mark.parametrize("kind", tk.KINDS)
def test_known_ids_and_special_tokens(kind, clip, open_clip_tok):
    tok = clip if kind == "clip" else open_clip_tok
    assert tok.tokenize(["a photo of a cat"]) == [[320, 1125, 539, 320, 2368]]
    assert (tok.id_start, tok.id_end, tok.comma_token) == (49406, 49407, 267)
    assert tok.id_pad == (49407 if kind == "clip" else 0)
    assert tok.vocab_size == 49408
    assert tok.token_to_id(",</w>") == 267 and tok.id_to_token(2368) == "cat</w>"
    assert tok.token_to_id("no-such-token") is None


def test_clip_matches_open_clip_reference(clip, reference_simple):
    assert clip.tokenize(CORPUS) == [reference_simple.encode(text) for text in CORPUS]


def test_open_clip_matches_transformers_reference(open_clip_tok, reference_hf):
    expected = reference_hf(CORPUS, add_special_tokens=False)["input_ids"]
    assert open_clip_tok.tokenize(CORPUS) == expected


def test_generated_files_drive_a_second_bpe_engine(clip, reference_fast, reference_simple):
    # The Rust tokenizer normalises without ftfy, so compare on text ftfy leaves alone.
    plain = [t for t in CORPUS if t.isascii()] + ["東京タワー 夜景", "emoji 🐱🔥👍🏽"]
    expected = [reference_simple.encode(t) for t in plain]
    assert reference_fast(plain, add_special_tokens=False)["input_ids"] == expected
    assert clip.tokenize(plain) == expected


def test_long_prompts_are_not_truncated(clip, open_clip_tok):
    for tok in (clip, open_clip_tok):
        ids = tok.tokenize([LONG])[0]
        assert len(ids) > 150
        assert ids.count(267) == 29 and 49407 not in ids


def test_cleaning_differs_only_where_the_webui_differs(clip, open_clip_tok):
    # open_clip html-unescapes unconditionally; ftfy (used by transformers) skips text that contains '<'.
    text = "<lora> fish &amp; chips"
    assert open_clip_tok.tokenize([text]) == open_clip_tok.tokenize(["<lora> fish & chips"])
    assert clip.tokenize([text]) != clip.tokenize(["<lora> fish & chips"])
    assert "amp" in clip.decode(clip.tokenize([text])[0])
    # Each flavour recognises its own spelling of the end token inside text.
    assert clip.tokenize(["<|endoftext|>"]) == [[49407]]
    assert open_clip_tok.tokenize(["<end_of_text>"]) == [[49407]]
    assert 49407 not in clip.tokenize(["<end_of_text>"])[0]


def test_ftfy_cleaning_is_active(clip, open_clip_tok):
    # Mojibake and fullwidth letters are repaired by ftfy in both flavours, as in the WebUI.
    for tok in (clip, open_clip_tok):
        assert tok.tokenize(["cafÃ©", "ＡＢＣ"]) == tok.tokenize(["café", "abc"])


def test_decode_round_trips_for_debugging(clip, open_clip_tok):
    for tok in (clip, open_clip_tok):
        assert tok.decode(tok.tokenize(["A Photo of a CAT"])[0]) == "a photo of a cat"


def test_cache_files_are_written_once_and_repaired(tmp_path, monkeypatch):
    folder = tk.ensure_hf_clip_files(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]  # no temp files left
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab[",</w>"] == 267
    assert (folder / "merges.txt").read_text(encoding="utf-8").count("\n") == tk.N_MERGES + 1

    calls = []
    real_read = tk.read_merges
    monkeypatch.setattr(tk, "read_merges", lambda path: calls.append(path) or real_read(path))
    tk.ensure_hf_clip_files(tmp_path)
    assert calls == []  # complete cache reused
    (folder / "vocab.json").unlink()  # as after a crash between the two writes
    tk.ensure_hf_clip_files(tmp_path)
    assert len(calls) == 1 and json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == vocab


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(tk.CACHE_ENV, str(tmp_path / "c"))
    assert tk.default_cache_dir() == tmp_path / "c"
    assert tk.ensure_hf_clip_files().parent.parent == tmp_path / "c"


def test_unwritable_cache_names_folder_and_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    from extensions_lib.errors import AlchemyError

    with pytest.raises(AlchemyError) as err:
        tk.ensure_hf_clip_files(blocker)
    assert str(blocker) in str(err.value) and tk.CACHE_ENV in str(err.value)


def test_unknown_kind():
    with pytest.raises(ValueError, match="open_clip"):
        tk.make_tokenizer("bert")
