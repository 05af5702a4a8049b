"""Pure image transforms of `alchemy preprocess`: resize, split, auto-sized crop, focal crop."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from extensions_lib.preprocess import autosize, focal, split
from extensions_lib.preprocess.resize import crop_and_resize


def random_rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- default crop-and-resize --------------------------------------------------------------------

@pytest.mark.parametrize("size,target", [((300, 200), (128, 128)), ((200, 300), (128, 96)), ((90, 300), (64, 128)),
                                         ((64, 64), (128, 128))])
def test_crop_and_resize_matches_the_webui_paste_recipe(size, target):
    img = random_rgb(*size)
    tw, th = target
    # The WebUI's images.resize_image(1, ...), written out: fill, then paste centred on a target canvas.
    if tw / th > img.width / img.height:
        w, h = tw, img.height * tw // img.width
    else:
        w, h = img.width * th // img.height, th
    canvas = Image.new("RGB", (tw, th))
    canvas.paste(img.resize((w, h), resample=Image.LANCZOS), box=(tw // 2 - w // 2, th // 2 - h // 2))
    out = crop_and_resize(img, tw, th)
    assert out.size == (tw, th)
    assert np.array_equal(np.asarray(out), np.asarray(canvas))


# ---- split ------------------------------------------------------------------------------------------

def test_should_split_uses_the_webui_ratio_and_threshold():
    assert split.split_ratio(512, 2048, 512, 512) == 0.25
    assert split.should_split(512, 2048, 512, 512, 0.5)
    assert split.should_split(2048, 512, 512, 512, 0.5)          # landscape too
    assert not split.should_split(512, 900, 512, 512, 0.5)       # 0.569 > threshold
    assert split.should_split(512, 900, 512, 512, 0.6)
    assert not split.should_split(512, 512, 512, 512, 1.0)       # ratio 1 never splits
    assert split.split_ratio(512, 1024, 256, 768) == (512 * 768) / (1024 * 256)  # target aspect counts


@pytest.mark.parametrize("length,tile,overlap", [(512, 128, 0.2), (513, 128, 0.2), (1000, 128, 0.0),
                                                 (1000, 128, 0.9), (129, 128, 0.5), (777, 96, 0.35)])
def test_tile_offsets_cover_with_the_documented_overlap_and_minimal_count(length, tile, overlap):
    offsets = split.tile_offsets(length, tile, overlap)
    assert offsets[0] == 0 and offsets[-1] + tile == length               # cover both ends
    gaps = np.diff(offsets)
    assert (gaps > 0).all()
    assert (tile - gaps >= math.floor(tile * overlap)).all()              # neighbours overlap enough
    # Independent: the fewest evenly spaced tiles whose step is at most tile*(1-overlap).
    n = 2
    while (length - tile) / (n - 1) > tile * (1 - overlap) + 1e-9:
        n += 1
    assert len(offsets) == n


def test_split_image_tiles_are_crops_of_the_independently_scaled_image():
    img = random_rgb(300, 1200)
    tiles = split.split_image(img, 128, 128, 0.2)
    scaled = np.asarray(img.resize((128, 1200 * 128 // 300), resample=Image.BICUBIC))  # 128 x 512
    assert [t.size for t in tiles] == [(128, 128)] * 5                    # ceil((512-25.6)/102.4) = 5
    for tile, y in zip(tiles, [0, 96, 192, 288, 384]):
        assert np.array_equal(np.asarray(tile), scaled[y:y + 128])

    wide = split.split_image(img.transpose(Image.Transpose.TRANSPOSE), 96, 128, 0.2)
    scaled_wide = np.asarray(img.transpose(Image.Transpose.TRANSPOSE).resize((1200 * 128 // 300, 128),
                                                                             resample=Image.BICUBIC))
    offsets = split.tile_offsets(512, 96, 0.2)
    assert len(wide) == len(offsets) == 7
    for tile, x in zip(wide, offsets):
        assert tile.size == (96, 128)
        assert np.array_equal(np.asarray(tile), scaled_wide[:, x:x + 96])


# ---- auto-sized crop --------------------------------------------------------------------------------

DEFAULTS = dict(min_dim=384, max_dim=768, min_area=64 * 64, max_area=640 * 640, threshold=0.1)


def test_aspect_error():
    assert autosize.aspect_error(1000, 500, 768, 384) == 0
    assert autosize.aspect_error(1000, 500, 384, 768) == pytest.approx(0.75)
    assert autosize.aspect_error(1000, 700, 768, 512) == pytest.approx(1 - (1000 / 700) / 1.5)


def test_choose_size_objectives_pick_what_the_webui_picked():
    # 1000x700 (10:7). Within 384..768 step 64 and area <= 409600, fits with error <= 0.1 include
    # 768x512 (area 393216, err 0.048) and 640x448 (exactly 10:7, area 286720).
    assert autosize.choose_size(1000, 700, objective="maximize-area", **DEFAULTS) == (768, 512)
    assert autosize.choose_size(1000, 700, objective="minimize-error", **DEFAULTS) == (640, 448)
    assert autosize.choose_size(1000, 500, objective="maximize-area", **DEFAULTS) == (768, 384)
    # 3:1 is beyond every candidate (at most 2:1) at threshold 0.1.
    assert autosize.choose_size(1200, 400, objective="maximize-area", **DEFAULTS) is None


def test_center_crop_resize_keeps_the_centre():
    img = Image.new("RGB", (1000, 500), "red")
    img.paste((0, 0, 255), (250, 0, 750, 500))  # blue centre square half
    out = autosize.center_crop_resize(img, 384, 384)  # square crop = exactly the blue part
    assert out.size == (384, 384)
    arr = np.asarray(out).astype(int)[:, 2:-2]  # LANCZOS reads a little past the box at the edges
    assert (abs(arr - [0, 0, 255]) <= 1).all()
    same_ratio = random_rgb(640, 448)
    assert np.array_equal(np.asarray(autosize.center_crop_resize(same_ratio, 320, 224)),
                          np.asarray(same_ratio.resize((320, 224), resample=Image.LANCZOS)))


# ---- focal crop -------------------------------------------------------------------------------------

def scene(w, h, patch, kind, seed=1):
    """Flat grey image with one object (noise, checkerboard or gradient) at patch=(x, y, size)."""
    arr = np.full((h, w, 3), 128, np.uint8)
    x, y, s = patch
    if kind == "noise":
        obj = np.random.default_rng(seed).integers(0, 256, (s, s, 3), dtype=np.uint8)
    elif kind == "checker":
        yy, xx = np.mgrid[0:s, 0:s]
        obj = np.where(((yy // 16 + xx // 16) % 2)[..., None] == 0, 255, 0).astype(np.uint8).repeat(3, 2)
    else:  # smooth ramp: many grey levels, no corners
        obj = np.linspace(0, 255, s * s).reshape(s, s).astype(np.uint8)[..., None].repeat(3, 2)
    arr[y:y + s, x:x + s] = obj
    return Image.fromarray(arr)


def object_fully_inside(crop, size):
    """Found from the crop's pixels alone: the non-background pixels span the whole object."""
    mask = (np.asarray(crop) != 128).any(axis=2)
    ys, xs = np.nonzero(mask)
    return len(xs) > 0 and xs.max() - xs.min() + 1 == size and ys.max() - ys.min() + 1 == size


@pytest.mark.parametrize("kind,weights", [
    ("noise", focal.FocalWeights(face=0, entropy=1, edges=0)),
    ("ramp", focal.FocalWeights(face=0, entropy=1, edges=0)),
    ("checker", focal.FocalWeights(face=0, entropy=0, edges=1)),
    ("noise", focal.FocalWeights()),
])
@pytest.mark.parametrize("where", ["left", "right"])
def test_focal_crop_keeps_the_object_inside(kind, weights, where):
    x = 40 if where == "left" else 1024 - 40 - 128
    img = scene(1024, 512, (x, 150, 128), kind)
    result = focal.focal_crop(img, 512, 512, weights)
    assert result.image.size == (512, 512)
    assert object_fully_inside(result.image, 128)
    # The centre crop would have cut it off: the focus really moved.
    assert not object_fully_inside(img.crop((256, 0, 768, 512)), 128)


def test_focal_crop_portrait_and_scaled():
    img = scene(256, 1024, (64, 800, 96), "checker")             # object low in a tall image
    result = focal.focal_crop(img, 128, 256, focal.FocalWeights(0, 0.5, 0.5))
    assert result.scaled.size == (128, 512) and result.image.size == (128, 256)
    left, top, right, bottom = result.box
    assert top <= 800 // 2 and bottom >= (800 + 96) // 2               # scaled object rows inside


def test_cover_scaling_never_leaves_the_image():
    img = Image.new("RGB", (600, 500), "white")                   # target more elongated than the image
    result = focal.focal_crop(img, 768, 512)
    assert result.image.size == (768, 512)
    assert (np.asarray(result.image) == 255).all()               # no black padding from outside the image


def test_face_points_pull_the_crop():
    img = scene(1024, 512, (850, 150, 128), "noise")
    seen = []

    def detector(scaled):
        seen.append(scaled.size)
        return [(60.0, 200.0)]

    result = focal.focal_crop(img, 512, 512, focal.FocalWeights(face=1, entropy=0, edges=0), face_detector=detector)
    assert seen == [(1024, 512)]
    assert result.box == (0, 0, 512, 512)
    # Weighted with the entropy point (object centre ~ 914): 0.9/(0.9+0.1) of the way to the face.
    blended = focal.focal_crop(img, 512, 512, focal.FocalWeights(face=0.9, entropy=0.1, edges=0),
                               face_detector=detector)
    entropy_x = focal.entropy_point(np.asarray(img.convert("L")), 512, 512)[0]
    assert blended.focus[0] == round(0.9 * 60 + 0.1 * entropy_x)


def test_window_entropies_match_a_direct_histogram():
    gray = np.random.default_rng(3).integers(0, 40, (37, 301)).astype(np.uint8)
    gray[:, 150:] //= 4  # fewer grey levels on the right: lower entropy
    starts, entropy = focal.window_entropies(gray, 64)
    assert starts[0] == 0 and starts[-1] == 301 - 64 and (np.diff(starts)[:-1] == 4).all()
    for start, value in zip(starts, entropy):
        counts = np.bincount(gray[:, start:start + 64].ravel(), minlength=256)
        p = counts[counts > 0] / counts.sum()
        assert value == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-9)


def test_corner_points_find_the_corners_of_a_square():
    gray = np.zeros((200, 300), np.uint8)
    gray[50:120, 100:180] = 255
    corners = focal.corner_points(gray)
    expected = [(100, 50), (179, 50), (100, 119), (179, 119)]
    assert len(corners) == 4
    for ex, ey in expected:
        assert min(math.hypot(x - ex, y - ey) for x, y in corners) <= 2
    assert focal.corner_points(np.full((50, 50), 7, np.uint8)) == []       # flat: nothing


def test_corner_points_respect_min_distance_and_cap():
    gray = np.asarray(random_rgb(200, 150).convert("L"))
    pts = np.array(focal.corner_points(gray))
    assert 0 < len(pts) <= focal.MAX_CORNERS
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) + np.eye(len(pts)) * 1e9
    assert d.min() >= 150 * focal.CORNER_MIN_DISTANCE
    assert pts[:, 1].max() < 150 * focal.WATERMARK_BAND + 2                # watermark band ignored


def test_debug_image_marks_the_crop():
    img = scene(1024, 512, (850, 150, 128), "checker")
    result = focal.focal_crop(img, 512, 512)
    dbg = np.asarray(focal.debug_image(result))
    left, top, right, bottom = result.box
    assert dbg.shape == (512, 1024, 3)
    assert tuple(dbg[top + 256, left]) == (0, 255, 0) and tuple(dbg[top + 256, right - 1]) == (0, 255, 0)


def test_no_face_detector_without_opencv():
    try:
        import cv2  # noqa: F401
    except ImportError:
        assert focal.opencv_face_detector() is None
    else:
        pytest.skip("OpenCV is installed here")
