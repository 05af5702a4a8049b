"""Model input preparation against independent numpy/PIL computations of the reference steps."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extensions_lib.tagger.preprocess import deepdanbooru_input, wd14_input


def reference_wd14(image: Image.Image, size: int) -> np.ndarray:
    """SmilingWolf's steps written out in numpy: white composite, centred white pad, BICUBIC, BGR."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    if side != size:
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))
    return canvas[:, :, ::-1].astype(np.float32)


def _image(rng, w, h, mode="RGB"):
    channels = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


@pytest.mark.parametrize("w,h", [(70, 40), (40, 70), (64, 64), (33, 20), (20, 33), (17, 17), (150, 149), (300, 90),
                                 (90, 300), (64, 30), (1, 5), (5, 1)])
def test_wd14_input_matches_reference_rgb(w, h):
    rng = np.random.default_rng(w * 1000 + h)
    image = _image(rng, w, h)
    got = wd14_input(image, 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_wd14(image, 64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("w,h", [(50, 30), (30, 50), (48, 48)])
def test_wd14_input_matches_reference_with_transparency(w, h):
    rng = np.random.default_rng(w + h)
    image = _image(rng, w, h, "RGBA")  # every alpha value from 0 to 255 occurs
    got = wd14_input(image, 48)
    np.testing.assert_allclose(got, reference_wd14(image, 48), atol=1e-4, rtol=0)


def test_wd14_transparent_pixels_become_white_and_channels_are_bgr():
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red, fully transparent except the left half
    arr[:, :4, 3] = 255
    got = wd14_input(Image.fromarray(arr, "RGBA"), 8)
    assert (got[:, 4:] == 255).all()
    assert got[0, 0].tolist() == [0.0, 0.0, 200.0]  # B, G, R


def reference_fill_band(edge: np.ndarray, inner: np.ndarray) -> np.ndarray:
    # A zero-height box resize with bicubic (a = -0.5) weighs the edge line 9/8 and its neighbour -1/8.
    value = (9 * edge.astype(np.int64) - inner.astype(np.int64)) / 8
    return np.clip(np.floor(value + 0.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(300, 120), (120, 300), (256, 256), (90, 37)])
def test_deepdanbooru_input_matches_host_resize_and_fill(w, h):
    size = 128
    rng = np.random.default_rng(w + 7 * h)
    image = _image(rng, w, h)
    got = deepdanbooru_input(image, size)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    if w >= h:
        fit_w, fit_h = size, h * size // w
    else:
        fit_w, fit_h = w * size // h, size
    fitted = np.asarray(image.resize((fit_w, fit_h), Image.LANCZOS))
    expected = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = size // 2 - fit_h // 2, size // 2 - fit_w // 2
    expected[top:top + fit_h, left:left + fit_w] = fitted
    if fit_h < size:
        expected[:top] = reference_fill_band(fitted[0], fitted[1])
        expected[top + fit_h:] = reference_fill_band(fitted[-1], fitted[-2])[None][:, :]
    if fit_w < size:
        expected[:, :left] = reference_fill_band(fitted[:, 0], fitted[:, 1])[:, None]
        expected[:, left + fit_w:] = reference_fill_band(fitted[:, -1], fitted[:, -2])[:, None]
    np.testing.assert_allclose(got, expected.astype(np.float32) / 255.0, atol=1e-4, rtol=0)


def test_deepdanbooru_drops_alpha_like_the_host():
    arr = np.zeros((16, 16, 4), dtype=np.uint8)
    arr[..., 1] = 255  # green, fully transparent: the host's convert("RGB") keeps the green
    got = deepdanbooru_input(Image.fromarray(arr, "RGBA"), 16)
    assert np.allclose(got[..., 1], 1.0) and np.allclose(got[..., 0], 0.0)
