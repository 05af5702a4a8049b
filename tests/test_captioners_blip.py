"""BLIP captions on a tiny random BLIP of the real architecture, checked against transformers itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioner_models import make_blip_folder
from extensions_lib.captioners import BlipOptions, load_blip
from extensions_lib.captioners.models import resolve_blip
from extensions_lib.errors import AlchemyError


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    return make_blip_folder(tmp_path_factory.mktemp("blip") / "tiny-blip")


def images(n: int = 3) -> list[Image.Image]:
    out = []
    for i in range(n):
        y, x = np.mgrid[0:48, 0:40]
        arr = np.stack([(x * (i + 1) * 13) % 256, (y * (7 - i) * 5) % 256, np.full_like(x, 60 * i)], -1)
        out.append(Image.fromarray(arr.astype(np.uint8)))
    return out


def reference(folder, ims, **kw) -> list[str]:
    """transformers' own processor + generate, one image at a time."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    proc = BlipProcessor.from_pretrained(folder, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    prompt = kw.pop("prompt", None)
    out = []
    for im in ims:
        inputs = proc(images=im, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, **kw)
        out.append(proc.decode(ids[0], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_captions_match_transformers_per_image(blip_folder, beams):
    blip = load_blip(blip_folder, device="cpu")
    ims = images()
    got = blip.caption(ims, BlipOptions(num_beams=beams, min_length=3, max_length=10))
    assert got == reference(blip_folder, ims, num_beams=beams, min_length=3, max_length=10)
    assert all(got) and len(set(got)) > 1  # the captions depend on the image


def test_conditional_prompt_starts_the_sentence_and_is_stripped(blip_folder):
    blip = load_blip(blip_folder, device="cpu")
    ims = images(2)
    full = reference(blip_folder, ims, prompt="a picture of", max_length=12)
    kept = blip.caption(ims, BlipOptions(prompt="a picture of", keep_prompt=True, max_length=12, min_length=0))
    stripped = blip.caption(ims, BlipOptions(prompt="a picture of", max_length=12, min_length=0))
    assert kept == full and all(t.startswith("a picture of ") for t in kept)
    assert stripped == [t[len("a picture of "):] for t in full]


def test_webui_beam_search_crash_does_not_happen_here(blip_folder):
    """The WebUI's BLIP repeats the image embeddings per beam before generate, and transformers 4.30.2
    expands them again: a shape error for num_beams > 1 (restated below). Ours must caption with beams."""
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(blip_folder, local_files_only=True).eval()
    pixels = torch.randn(2, 3, 32, 32)
    beams = 3
    embeds = model.vision_model(pixel_values=pixels)[0].repeat_interleave(beams, 0)  # the WebUI's pre-repeat
    text = model.config.text_config
    with pytest.raises(RuntimeError, match="must match"):
        model.text_decoder.generate(input_ids=torch.full((2, 1), text.bos_token_id), max_length=10, num_beams=beams,
                                    eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
                                    encoder_hidden_states=embeds,
                                    encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long))
    captions = load_blip(blip_folder, device="cpu").caption(images(2), BlipOptions(num_beams=beams, max_length=10))
    assert len(captions) == 2 and all(captions)


def test_pytorch_bin_loads_through_the_restricted_loader(tmp_path, blip_folder, monkeypatch):
    folder = make_blip_folder(tmp_path / "bin-blip", safetensors=False)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    calls = []
    import extensions_lib.safe_pickle as sp

    real = sp.safe_load
    monkeypatch.setattr(sp, "safe_load", lambda *a, **k: calls.append(a) or real(*a, **k))
    blip = load_blip(folder, device="cpu")
    assert calls, "the .bin must go through safe_load"
    ims = images(2)
    assert blip.caption(ims, BlipOptions(max_length=10)) == reference(blip_folder, ims, max_length=10, min_length=5)


def test_missing_model_and_offline_download_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AlchemyError) as err:
        resolve_blip("blip-base", tmp_path, download=True)
    assert "HF_HUB_OFFLINE" in err.value.message and "82a37760" in err.value.message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(AlchemyError, match="cannot reach"):
        resolve_blip("blip-base", tmp_path, download=True, reachable=lambda: False)
    with pytest.raises(AlchemyError, match="not found"):
        resolve_blip("nothing-here", tmp_path)
