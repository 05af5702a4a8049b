"""Creating aesthetic embeddings and reading the original's files."""
from __future__ import annotations

import pickle

import pytest
import torch

from extensions_lib.aesthetic.clip_models import (load_image_encoder, load_text_projection, resolve_clip,
                                                  download_clip)
from extensions_lib.aesthetic.create import clip_pixels, create_embedding, embed_folder
from extensions_lib.aesthetic.file import AestheticLibrary, load_aesthetic, save_aesthetic
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.tagger.image_io import decode_image
from tests.aesthetic_fakes import HF_PROJECTION, IMAGE_SIZE, OPEN_CLIP_EMBED, make_hf_clip, make_images, make_open_clip


def test_hf_create_is_mean_of_normalised_features_of_transformers_model(tmp_path):
    from transformers import CLIPModel

    clip = make_hf_clip(tmp_path / "clip")
    images = make_images(tmp_path / "imgs", count=5)
    (images / "broken.png").write_bytes(b"not an image")
    encoder = load_image_encoder(clip)
    seen = []
    out, result = create_embedding(encoder, images, tmp_path / "emb" / "style.pt", batch_size=2,
                                   progress=lambda done, total: seen.append((done, total)))
    assert result.used == 5 and [p.name for p, _ in result.skipped] == ["broken.png"]
    assert seen == [(2, 6), (4, 6), (6, 6)]   # batches of 2; the broken file (last) only skipped

    # independent: transformers' own CLIPModel.get_image_features, one image at a time
    reference = CLIPModel.from_pretrained(str(clip)).eval()
    feats = []
    for path in sorted(images.glob("0*.png")):
        with torch.no_grad():
            f = reference.get_image_features(pixel_values=clip_pixels(decode_image(path), IMAGE_SIZE)[None])
        feats.append(f[0] / f[0].norm())
    expected = torch.stack(feats).mean(0)
    data = torch.load(out, map_location="cpu", weights_only=True)
    assert data.shape == (1, HF_PROJECTION) and data.dtype == torch.float32
    torch.testing.assert_close(data[0], expected, rtol=1e-5, atol=1e-6)
    assert check_host_loadable(out.read_bytes(), str(out)) == []


def test_open_clip_create_matches_open_clip_encode_image(tmp_path):
    import open_clip

    from tests.aesthetic_fakes import open_clip_cfg

    clip = make_open_clip(tmp_path / "oc")
    images = make_images(tmp_path / "imgs", count=3, size=(30, 50))
    result = embed_folder(load_image_encoder(clip), images, batch_size=8)
    model = open_clip.model.CLIP(**open_clip_cfg())
    model.load_state_dict(torch.load(clip / "open_clip_pytorch_model.bin"))
    model.eval()
    pixels = torch.stack([clip_pixels(decode_image(p), IMAGE_SIZE) for p in sorted(images.glob("*.png"))])
    with torch.no_grad():
        feats = model.encode_image(pixels, normalize=True)
    assert result.vector.shape == (OPEN_CLIP_EMBED,)
    torch.testing.assert_close(result.vector, feats.mean(0), rtol=1e-5, atol=1e-6)


def test_clip_pixels_resizes_short_side_and_centre_crops():
    from PIL import Image

    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 15, 30))  # a blue band on the left falls outside the centre crop
    pixels = clip_pixels(image, 28)
    assert pixels.shape == (3, 28, 28)
    red = (1.0 - 0.48145466) / 0.26862954
    assert torch.allclose(pixels[0], torch.full((28, 28), red), atol=0.05)


def _save_like_original(tensor: torch.Tensor, path, device_tag: str) -> None:
    """torch.save's zip layout, with the storage's recorded location replaced (what a CUDA save writes)."""
    torch.save(tensor, path)
    import zipfile

    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    import struct

    old = b"X" + struct.pack("<I", 3) + b"cpu"   # protocol 2 BINUNICODE, as torch.save writes it
    assert entries[name].count(old) == 1
    entries[name] = entries[name].replace(old, b"X" + struct.pack("<I", len(device_tag)) + device_tag.encode())
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)


@pytest.mark.parametrize("dtype,device", [(torch.float16, "cpu"), (torch.float32, "cuda:0"), (torch.float16, "cuda:0")])
def test_original_files_load_fp16_and_cuda_saved(tmp_path, dtype, device):
    value = torch.randn(1, 768).to(dtype)
    path = tmp_path / "laion_7plus.pt"
    _save_like_original(value, path, device)
    if device != "cpu" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # what a plain torch.load does on a CPU machine
            torch.load(path, weights_only=False)
    emb = load_aesthetic(path)
    assert emb.name == "laion_7plus" and emb.vector.dtype == torch.float32 and emb.dim == 768
    torch.testing.assert_close(emb.vector, value[0].float())


def test_bad_files_are_refused_with_reason_and_skipped_in_listing(tmp_path):
    save_aesthetic(torch.randn(768), tmp_path / "good.pt")
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}}, tmp_path / "ti.pt")
    torch.save(torch.zeros(1, 768), tmp_path / "zero.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    library = AestheticLibrary(tmp_path)
    assert library.usable() == ["good"]
    assert set(library.skipped) == {"ti", "zero", "evil"}
    with pytest.raises(AlchemyError, match="not found"):
        library.path("missing")
    with pytest.raises(AlchemyError, match="unusable"):
        library.path("../good")


def test_resolve_and_download_offline(tmp_path, monkeypatch):
    with pytest.raises(AlchemyError, match="--download") as info:
        resolve_clip(None, "sd1", tmp_path)
    assert "openai/clip-vit-large-patch14" in info.value.message
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(AlchemyError, match="cannot be reached"):
        download_clip("sd2", tmp_path, reachable=lambda: False)
    clip = make_hf_clip(tmp_path / "clip-vit-large-patch14")
    assert resolve_clip(None, "sd1", tmp_path) == clip
    assert resolve_clip("clip-vit-large-patch14", "sd1", tmp_path) == clip
    projection = load_text_projection(clip)
    assert projection.shape == (32, HF_PROJECTION)
