"""Every embedding form the WebUI reads: each writer through each reader bit-exact, our .pt read by the
host's rules, the genuine WebUI files, image codecs against an independent encoder, bad files."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import (
    Embedding, is_embedding_candidate, read_embedding, scan_embedding_dir, write_embedding)
from extensions_lib.formats.embedding_image import insert_pixel_data, save_embedding_image
from extensions_lib.formats.embedding_pt import load_optimizer_state, optim_path, save_optimizer_state
from extensions_lib.formats.host_pt_rules import check_host_loadable
from host_pt_reference import host_checksum, host_embedding_from_data, host_read_pt_embedding

REPO = Path(__file__).resolve().parents[1]
TORCH21 = REPO / ".venv-torch21" / "bin" / "python"


def make_embedding(n=2, width=768, name="thing", seed=0, **kw) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    defaults = dict(step=120, sd_checkpoint="b60ad7926a", sd_checkpoint_name="random-sd15",
                    extra={"init_text": "a cat", "tool": "alchemy"})
    defaults.update(kw)
    return Embedding(name=name, vectors=torch.randn(n, width, generator=g) * 0.02, **defaults)


def make_sdxl(n=3, seed=1) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    return Embedding(name="xl", vectors={"clip_l": torch.randn(n, 768, generator=g),
                                         "clip_g": torch.randn(n, 1280, generator=g)}, step=9)


def assert_same_vectors(a, b):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_same_vectors(a[k], b[k])
        return
    assert a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit-exact, -0.0 and NaN included


# --- round trips -----------------------------------------------------------------------------------

WRITERS = {
    "pt": ("thing.pt", {}),
    "safetensors": ("thing.safetensors", {}),
    "png-both": ("thing-pic.png", {}),
    "png-text": ("thing-pic.png", {"pixels": False}),
    "png-pixels": ("thing-pic.png", {"text_chunk": False}),
    "webp": ("thing-pic.webp", {}),
}


@pytest.mark.parametrize("form", list(WRITERS))
@pytest.mark.parametrize("n,width", [(1, 768), (4, 1024)])
def test_each_writer_through_reader_is_bit_exact(tmp_path, form, n, width):
    filename, kwargs = WRITERS[form]
    emb = make_embedding(n, width)
    emb.vectors[0, 0] = -0.0
    path = write_embedding(emb, tmp_path / filename, **kwargs)
    back = read_embedding(path)
    assert_same_vectors(back.vectors, emb.vectors)
    assert (back.num_vectors, back.width) == (n, width)
    assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (120, "b60ad7926a", "random-sd15")
    assert back.extra == emb.extra
    # .pt/.safetensors are named after the file (host rule); images by the name stored inside
    assert back.name == ("thing" if form in ("pt", "safetensors") else emb.name)
    assert back.filename == str(path)


def test_sdxl_safetensors_round_trip_and_host_layout(tmp_path):
    emb = make_sdxl()
    path = write_embedding(emb, tmp_path / "xl.safetensors")
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert sorted(raw) == ["clip_g", "clip_l"]
    name, vec, vectors, shape, *_ = host_embedding_from_data(raw, "xl")
    assert (vectors, shape) == (3, 2048)
    back = read_embedding(path)
    assert back.is_sdxl and back.width == 2048 and back.num_vectors == 3 and back.step == 9
    assert_same_vectors(back.vectors, emb.vectors)
    assert_same_vectors(back.vectors, vec)


def test_sdxl_pt_is_the_bare_pair(tmp_path):
    emb = make_sdxl()
    path = write_embedding(emb, tmp_path / "xl.pt")
    assert check_host_loadable(path) == []
    _, vec, vectors, shape, *_ = host_read_pt_embedding(path)
    assert (vectors, shape) == (3, 2048)
    assert_same_vectors(read_embedding(path).vectors, vec)


def test_sdxl_has_no_image_form(tmp_path):
    with pytest.raises(ValueError):
        write_embedding(make_sdxl(), tmp_path / "xl.png")
    assert not (tmp_path / "xl.png").exists()


def test_third_party_sdxl_safetensors_listed(tmp_path):
    from safetensors.torch import save_file

    save_file({"clip_l": torch.randn(2, 768).half(), "clip_g": torch.randn(2, 1280).half()}, str(tmp_path / "x.safetensors"))
    write_embedding(make_embedding(name="a"), tmp_path / "sub" / "a.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an embedding")
    write_embedding(make_embedding(name="pic"), tmp_path / "b.preview.png")
    (tmp_path / "broken.bin").write_bytes(b"\x80\x02garbage")
    found, problems = scan_embedding_dir(tmp_path)
    assert [e.name for e in found] == ["a", "x"]
    xl = found[1]
    assert xl.is_sdxl and xl.width == 2048 and xl.vectors["clip_g"].dtype == torch.float32
    assert len(problems) == 1 and "broken.bin" in problems[0].message


# --- our .pt by the host's rules ---------------------------------------------------------------------

def test_our_pt_by_host_rules(tmp_path):
    emb = make_embedding(3, 768)
    path = write_embedding(emb, tmp_path / "mine.pt")
    assert check_host_loadable(path) == []
    name, vec, vectors, shape, step, ckpt, ckpt_name = host_read_pt_embedding(path)
    assert (name, vectors, shape, step, ckpt, ckpt_name) == ("mine", 3, 768, 120, "b60ad7926a", "random-sd15")
    assert_same_vectors(vec, emb.vectors)
    with zipfile.ZipFile(path) as z:
        assert len(z.namelist()) == 5


def test_our_pt_in_host_torch(tmp_path):
    if not TORCH21.exists():
        pytest.skip("no .venv-torch21")
    emb = make_embedding(2, 768)
    path = write_embedding(emb, tmp_path / "mine.pt")
    script = ("import sys, torch, numpy as np; sys.path.insert(0, sys.argv[1]); "
              "from host_pt_reference import host_read_pt_embedding as r; "
              "name, vec, *rest = r(sys.argv[2]); np.save(sys.argv[2] + '.npy', vec.numpy()); "
              "print(torch.__version__, name, rest)")
    proc = subprocess.run([str(TORCH21), "-c", script, str(REPO / "tests"), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2.1.") and "mine [2, 768, 120, 'b60ad7926a', 'random-sd15']" in proc.stdout
    assert np.array_equal(np.load(str(path) + ".npy"), emb.vectors.numpy())


# --- genuine WebUI files -----------------------------------------------------------------------------

def test_genuine_webui_embeddings(webui_files):
    fresh = read_embedding(webui_files / "ref-emb-2v.pt")
    trained = read_embedding(webui_files / "ref-emb-2v-trained.pt")
    assert (fresh.name, fresh.num_vectors, fresh.width, fresh.step) == ("ref-emb-2v", 2, 768, 0)
    assert fresh.sd_checkpoint is None and fresh.sd_checkpoint_name is None
    assert (trained.name, trained.num_vectors, trained.width, trained.step) == ("ref-emb-2v-trained", 2, 768, 3)
    assert (trained.sd_checkpoint, trained.sd_checkpoint_name) == ("b60ad7926a", "random-sd15")
    assert not torch.equal(fresh.vectors, trained.vectors)  # training moved them
    _, vec, *_ = host_read_pt_embedding(str(webui_files / "ref-emb-2v-trained.pt"))
    assert_same_vectors(trained.vectors, vec)
    assert trained.checksum() == host_checksum(trained.vectors)


def test_rewriting_a_genuine_embedding_keeps_its_layout(tmp_path, webui_files):
    src = webui_files / "ref-emb-2v-trained.pt"
    emb = read_embedding(src)
    emb.extra = {}
    out = write_embedding(emb, tmp_path / src.name)
    ours, theirs = (torch.load(p, weights_only=True) for p in (out, src))
    assert list(ours) == list(theirs)
    for key in theirs:
        if key != "string_to_param":
            assert ours[key] == theirs[key], key
    assert_same_vectors(ours["string_to_param"]["*"], theirs["string_to_param"]["*"])


# --- dtypes, devices, legacy layouts -------------------------------------------------------------------

def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _relocate_to_cuda(src: Path, dst: Path) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert _binunicode("cpu") in body
                body = body.replace(_binunicode("cpu"), _binunicode("cuda:0"))
            zout.writestr(info.filename, body)
    dst.write_bytes(out.getvalue())


def test_fp16_tensor_saved_on_cuda_loads_as_float32_cpu(tmp_path):
    half = (torch.randn(2, 768) * 0.02).half()
    plain = tmp_path / "plain.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": half}, "name": "x", "step": 1}, plain)
    path = tmp_path / "gpu-half.pt"
    _relocate_to_cuda(plain, path)
    emb = read_embedding(path)
    assert emb.vectors.dtype == torch.float32 and emb.vectors.device.type == "cpu"
    assert torch.equal(emb.vectors, half.float())


def test_diffusers_bin_single_1d_tensor(tmp_path):
    vec = torch.randn(768).half()
    plain = tmp_path / "plain.bin"
    torch.save({"<cat-toy>": vec}, plain)
    path = tmp_path / "learned_embeds.bin"
    _relocate_to_cuda(plain, path)
    emb = read_embedding(path)
    assert emb.name == "learned_embeds" and emb.vectors.shape == (1, 768) and emb.step is None
    assert torch.equal(emb.vectors[0], vec.float())


def test_old_parameter_dict_layout(tmp_path):
    vec = torch.randn(3, 768)
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())}),
                "name": "stored-name", "step": 55}, path)
    emb = read_embedding(path)
    assert emb.name == "old" and emb.step == 55  # .pt name comes from the file, as in the host
    assert_same_vectors(emb.vectors, vec)


def test_kohya_safetensors_fp16_without_metadata(tmp_path):
    from safetensors.torch import save_file

    vec = torch.randn(2, 1024).to(torch.bfloat16)
    save_file({"emb_params": vec}, str(tmp_path / "kohya.safetensors"))
    emb = read_embedding(tmp_path / "kohya.safetensors")
    assert emb.name == "kohya" and emb.step is None and emb.extra == {}
    assert torch.equal(emb.vectors, vec.float())


def test_legacy_non_zip_pt(tmp_path):
    vec = torch.randn(2, 768)
    path = tmp_path / "legacy.pt"
    torch.save({"string_to_param": {"*": vec}, "step": 2}, path, _use_new_zipfile_serialization=False)
    assert_same_vectors(read_embedding(path).vectors, vec)


# --- image codecs against an independent encoder -----------------------------------------------------

def _reference_json(data) -> str:
    class Enc(json.JSONEncoder):
        def default(self, obj):
            if isinstance(obj, torch.Tensor):
                return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
            return json.JSONEncoder.default(self, obj)

    return json.dumps(data, cls=Enc)


def _reference_pixel_embed(image: Image.Image, data: dict) -> Image.Image:
    """The documented encoder (a1111-host.md 4.1 (d) 2), written out step by step."""
    d = 3
    payload = np.frombuffer(zlib.compress(_reference_json(data).encode(), level=9), np.uint8)
    hi, lo = payload >> 4, payload & 0x0F
    h = image.height
    n = len(payload) + (h - len(payload) % h)
    n = n + (h * d - n % (h * d))
    blocks = [np.resize(arr, n).reshape(h, n // (h * d), d) for arr in (lo, hi)]

    edge = list(data["string_to_param"].values())[0].numpy().tolist()[0][:1024]
    edge = (np.abs(edge) / np.max(np.abs(edge)) * 255).astype(np.uint8)

    def style(block, seq):
        canvas = Image.new("RGB", (block.shape[1], block.shape[0]))
        draw = ImageDraw.Draw(canvas)
        i = 0
        for x in range(-6, canvas.width, 8):
            for yi, y in enumerate(range(-6, canvas.height, 8)):
                off = 4 if yi % 2 == 0 else 0
                shade = int(seq[i % len(seq)])
                draw.ellipse((x + off, y, x + 6 + off, y + 6), fill=(shade, shade, shade))
                i += 1
        return block ^ (np.array(canvas).astype(np.uint8) & 0xF0)

    def scramble(block):
        seed, rand = 0, []
        for _ in range(block.size):
            seed = (1664525 * seed + 1013904223) % 2**32
            rand.append(seed % 255)
        return block ^ (np.array(rand, dtype=np.uint8).reshape(block.shape) & 0x0F)

    lo_img = Image.fromarray(scramble(style(blocks[0], edge)), "RGB")
    hi_img = Image.fromarray(scramble(style(blocks[1], edge[::-1])), "RGB")
    canvas = Image.new("RGB", (image.width + lo_img.width + hi_img.width + 2, h), (0, 0, 0))
    canvas.paste(lo_img, (0, 0))
    canvas.paste(image, (lo_img.width + 1, 0))
    canvas.paste(hi_img, (lo_img.width + 1 + image.width + 1, 0))
    return canvas


def _preview(w=96, h=64, seed=3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 255, (h, w, 3), dtype=np.uint8), "RGB")


def test_pixel_encoder_matches_independent_fixture():
    emb = make_embedding(2, 768)
    data = emb.host_dict()
    ours = np.asarray(insert_pixel_data(_preview(), data))
    ref = np.asarray(_reference_pixel_embed(_preview(), data))
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    # the image sits between two pure-black separator columns
    lo_w = (ref.shape[1] - 96 - 2) // 2
    assert not ref[:, lo_w].any() and not ref[:, lo_w + 1 + 96].any()


@pytest.mark.parametrize("ext,fmt,kw", [(".png", "PNG", {}), (".webp", "WEBP", {"lossless": True, "quality": 100})])
def test_reader_decodes_independent_pixel_fixture(tmp_path, ext, fmt, kw):
    emb = make_embedding(3, 768, name="hidden-name-25")
    emb.extra = {}
    path = tmp_path / f"renamed{ext}"
    _reference_pixel_embed(_preview(), emb.host_dict()).save(path, format=fmt, **kw)
    back = read_embedding(path)
    assert back.name == "hidden-name-25" and back.step == 120
    assert_same_vectors(back.vectors, emb.vectors)


def test_reader_decodes_independent_text_chunk_fixture(tmp_path):
    vec = torch.randn(2, 768, dtype=torch.float64)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "from-chunk", "step": 4,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(_reference_json(data).encode()))
    path = tmp_path / "whatever.png"
    _preview().save(path, pnginfo=info)
    back = read_embedding(path)
    assert back.name == "from-chunk" and back.step == 4 and back.vectors.dtype == torch.float32
    assert torch.equal(back.vectors, vec.float())


def test_text_chunk_written_as_host_writes_it(tmp_path):
    emb = make_embedding(1, 768)
    path = save_embedding_image(emb, tmp_path / "e.png", _preview(), pixels=False)
    with Image.open(path) as im:
        decoded = json.loads(base64.b64decode(im.text["sd-ti-embedding"]))
        assert im.size == (96, 64)
    assert decoded["string_to_param"]["*"]["TORCHTENSOR"] == emb.vectors.tolist()
    assert decoded["string_to_token"] == {"*": 265} and decoded["name"] == "thing"


def test_pixel_data_survives_png_to_webp_conversion(tmp_path):
    emb = make_embedding(2, 768)
    png = save_embedding_image(emb, tmp_path / "e.png", _preview(), text_chunk=False)
    webp = tmp_path / "converted.webp"
    with Image.open(png) as im:
        im.save(webp, "WEBP", lossless=True)
    assert_same_vectors(read_embedding(webp).vectors, emb.vectors)


def test_plain_image_and_lossy_reencode_are_clear_errors(tmp_path):
    plain = tmp_path / "photo.png"
    _preview().save(plain)
    with pytest.raises(AlchemyError) as err:
        read_embedding(plain)
    assert str(plain) in err.value.message and "no embedding" in err.value.message
    lossy = tmp_path / "lossy.webp"
    with Image.open(save_embedding_image(make_embedding(), tmp_path / "e.png", _preview(), text_chunk=False)) as im:
        im.save(lossy, "WEBP", quality=60)
    with pytest.raises(AlchemyError) as err:
        read_embedding(lossy)
    assert str(lossy) in err.value.message


def test_preview_files_are_skipped_like_the_host():
    assert not is_embedding_candidate(REPO / "nope.preview.png")
    assert not is_embedding_candidate(REPO / "README.md")


# --- optimizer side file -------------------------------------------------------------------------------

def test_optimizer_state_side_file(tmp_path):
    emb = make_embedding(2, 768)
    param = emb.vectors.clone().requires_grad_()
    opt = torch.optim.AdamW([param], lr=0.005)
    param.sum().backward()
    opt.step()
    emb.vectors = param.detach().clone()
    pt = write_embedding(emb, tmp_path / "t.pt")
    side = save_optimizer_state(emb, pt, opt.state_dict())
    assert side == optim_path(pt) and side.name == "t.pt.optim"
    assert check_host_loadable(side) == []
    raw = torch.load(side, weights_only=True)
    assert sorted(raw) == ["hash", "optimizer_state_dict"] and raw["hash"] == host_checksum(emb.vectors)

    state = load_optimizer_state(read_embedding(pt), pt)
    fresh = torch.optim.AdamW([param], lr=0.005)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state[param]["exp_avg"], opt.state[param]["exp_avg"])
    assert torch.equal(fresh.state[param]["exp_avg_sq"], opt.state[param]["exp_avg_sq"])

    emb.vectors = emb.vectors + 1.0  # vectors changed since the state was saved: state not used
    assert load_optimizer_state(emb, pt) is None
    assert load_optimizer_state(emb, tmp_path / "missing.pt") is None


@pytest.mark.parametrize("seed", range(3))
def test_checksum_matches_host_formula(seed):
    emb = make_embedding(3, 768, seed=seed)
    emb.vectors = emb.vectors * 50  # values well beyond +-1 so int() truncation matters
    assert emb.checksum() == host_checksum(emb.vectors)


# --- malformed files -----------------------------------------------------------------------------------

def _lora_file(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({f"lora_unet_down_blocks_0_attn_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(3)}
              | {"lora_unet_down_blocks_0_attn_0.alpha": torch.tensor(4.0)}, str(path))
    return path


def _bad_files(tmp_path: Path, webui_files: Path) -> dict[str, Path]:
    files = {}
    files["lora"] = _lora_file(tmp_path / "lora.safetensors")
    files["hypernetwork"] = webui_files / "ref-hn-121-relu.pt"
    files["random"] = tmp_path / "random.pt"
    files["random"].write_bytes(os.urandom(2048))
    good = write_embedding(make_embedding(), tmp_path / "good.pt").read_bytes()
    files["truncated-pt"] = tmp_path / "truncated.pt"
    files["truncated-pt"].write_bytes(good[: len(good) // 2])
    st = write_embedding(make_embedding(), tmp_path / "good.safetensors").read_bytes()
    files["truncated-st"] = tmp_path / "truncated.safetensors"
    files["truncated-st"].write_bytes(st[: len(st) - 100])
    png = write_embedding(make_embedding(), tmp_path / "good.png", text_chunk=False).read_bytes()
    files["truncated-png"] = tmp_path / "truncated.png"
    files["truncated-png"].write_bytes(png[: len(png) // 2])
    files["two-terms"] = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 768), "#": torch.ones(1, 768)}}, files["two-terms"])
    files["not-a-dict"] = tmp_path / "list.pt"
    torch.save([torch.ones(1, 768)], files["not-a-dict"])
    files["unexpected-object"] = tmp_path / "obj.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 768)}, "when": __import__("datetime").date(2024, 1, 1)},
               files["unexpected-object"])
    files["empty"] = tmp_path / "empty.bin"
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("kind", ["lora", "hypernetwork", "random", "truncated-pt", "truncated-st", "truncated-png",
                                  "two-terms", "not-a-dict", "unexpected-object", "empty"])
def test_malformed_files_name_the_file(tmp_path, webui_files, kind):
    path = _bad_files(tmp_path, webui_files)[kind]
    with pytest.raises(AlchemyError) as err:
        read_embedding(path)
    assert str(path) in err.value.message and err.value.fix
    expected = {"lora": "LoRA", "hypernetwork": "hypernetwork", "two-terms": "multiple terms",
                "unexpected-object": "datetime.date"}.get(kind)
    if expected:
        assert expected in err.value.message


def test_unwritable_form_keeps_existing_file(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        write_embedding(make_embedding(), target, text_chunk=False, pixels=False)
    assert target.read_bytes() == b"old"
    with pytest.raises(AlchemyError):
        write_embedding(make_embedding(), tmp_path / "x.jpg")


@pytest.mark.parametrize("count", [0, 1, 4095, 4096, 4097, 12289])
def test_lcg_stream_matches_plain_recurrence(count):
    from extensions_lib.formats.embedding_image import lcg_mask

    seed, expected = 0, []
    for _ in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        expected.append((seed % 255) & 0x0F)
    assert lcg_mask(count).tolist() == expected
