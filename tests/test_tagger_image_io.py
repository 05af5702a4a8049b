"""Robust decoding: every odd file is either an RGB/RGBA image or a skip with a reason, fast."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, features

from extensions_lib.tagger.image_io import ImageSkipped, decode_image, list_images


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but holds almost no data (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def skip_reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageSkipped) as err:
        decode_image(data, **kwargs)
    return err.value.reason


def test_zero_byte_and_not_an_image(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty" in skip_reason(empty)
    assert "not an image" in skip_reason(b"hello, I am a text file named .png")


def test_truncated_jpeg_and_png_are_skipped():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = encode(noisy, fmt)
        reason = skip_reason(data[: len(data) // 2])
        assert "truncated" in reason or "corrupt" in reason


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    opaque = decode_image(encode(pal, "PNG"))
    assert opaque.mode == "RGB" and opaque.getpixel((0, 0)) == (0, 255, 0)
    see_through = decode_image(encode(pal, "PNG", transparency=1))
    assert see_through.mode == "RGBA" and see_through.getpixel((0, 0))[3] == 0


def test_la_becomes_rgba():
    la = Image.new("LA", (3, 3), (100, 50))
    out = decode_image(encode(la, "PNG"))
    assert out.mode == "RGBA" and out.getpixel((1, 1)) == (100, 100, 100, 50)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    out = decode_image(data)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb():
    out = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(data)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.skipif(not features.check("webp_anim"), reason="Pillow built without animated WebP")
def test_animated_webp_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    out = decode_image(data)
    assert out.getpixel((8, 8))[:3] == (255, 0, 0)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_huge_images_are_refused_from_the_header_without_decoding():
    started = time.perf_counter()
    assert "too large" in skip_reason(png_header_only(60000, 60000))  # beyond PIL's own bomb limit
    with pytest.warns(Image.DecompressionBombWarning):
        reason = skip_reason(png_header_only(10000, 10000))  # beyond our default limit only
    assert "over the limit" in reason and "--max-pixels" in reason
    assert "over the limit" in skip_reason(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9999)
    assert time.perf_counter() - started < 2.0


def test_list_images_filters_and_recurses(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ("a.png", "b.JPG", "notes.txt", "sub/c.webp", ".hidden/d.png", "sub/e.gif"):
        (tmp_path / rel).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == \
        ["a.png", "b.JPG", "sub/c.webp", "sub/e.gif"]
