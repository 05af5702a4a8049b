"""Captioning throughput and CLIP-interrogator caching, measured side by side in one run.

1. BLIP: `caption_directory` (our entry point: batched `generate`, a folder on disk, a model folder
   loaded from disk) against the per-image loop the reference tools run (the WebUI's interrogator and
   crosstyan/blip_helper caption one image at a time: open, preprocess one image, `generate`, decode),
   both on the same transformers BLIP of reduced size (random weights; ViT 224/16 with 6 layers of
   width 384, a 6-layer width-384 text decoder with BLIP's 30524-word vocabulary, so that as in the real
   model the word-by-word decoding, not the image encoder, takes most of the time) with
   greedy decoding to a fixed length (min_length = max_length, so both do the same number of steps).
2. CLIP interrogator (fast mode): a cold run (empty cache: every label text-encoded, every image
   encoded), a run with the label tables cached but new images, and a warm re-run (everything cached),
   on the shipped label lists cut to --labels labels per list (all of mediums/movements/trendings), with
   an open_clip CLIP of reduced size (ViT 224/32, width 256, 4 layers each tower).

Timings are medians over --repeats; variants alternate within each repeat so background load on a shared
machine falls on all of them alike. Rerun:

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_captioners.py
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def make_blip(folder: Path) -> Path:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, BlipTextConfig, BlipVisionConfig)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]",
                                                 *(f"w{i}" for i in range(30518))]) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=384, encoder_hidden_size=384, intermediate_size=1536,
                          num_attention_heads=6, num_hidden_layers=6, bos_token_id=tok.bos_token_id,
                          sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    vision = BlipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                              image_size=224, patch_size=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    BlipProcessor(BlipImageProcessor(size={"height": 224, "width": 224}), tok).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def make_clip(folder: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 256, "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def make_images(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.integers(300, 700, size=2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{seed}_{i}.jpg", quality=90)
    return folder


def per_image_loop(blip_dir: Path, images: Path, length: int) -> dict:
    """The reference tools' way: one image at a time, written to its .txt."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    proc = BlipProcessor.from_pretrained(blip_dir)
    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    out = {}
    for path in sorted(images.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        inputs = proc(images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, num_beams=1, min_length=length, max_length=length)
        out[path.name] = proc.decode(ids[0], skip_special_tokens=True).strip()
        path.with_suffix(".txt").write_text(out[path.name])
    return out


def ours(blip_dir: Path, images: Path, cache: Path, length: int, batch: int):
    from extensions_lib.captioners import BlipOptions, CaptionRunOptions, ComposeOptions, Models, caption_directory
    from extensions_lib.tagger import ModelSlot

    slot = ModelSlot()
    try:
        return caption_directory(images, Models(blip=blip_dir), CaptionRunOptions(cache=False, cache_dir=cache,
                                                                                    batch_size=batch, device="cpu"),
                                 ComposeOptions(existing_caption="overwrite", token_budget=0), slot=slot,
                                 blip_opts=BlipOptions(min_length=length, max_length=length))
    finally:
        slot.unload()


def clip_run(clip_dir: Path, images: Path, cache: Path, labels: Path):
    from extensions_lib.captioners import CaptionRunOptions, ComposeOptions, InterrogateOptions, Models, caption_directory
    from extensions_lib.tagger import ModelSlot

    slot = ModelSlot()
    try:
        return caption_directory(images, Models(clip=clip_dir, clip_name="bench/clip"),
                                 CaptionRunOptions(cache_dir=cache, labels_dir=labels, device="cpu", batch_size=8),
                                 ComposeOptions(existing_caption="overwrite", order=["clip"]), slot=slot,
                                 clip_opts=InterrogateOptions(mode="fast"))
    finally:
        slot.unload()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--length", type=int, default=20, help="caption length in tokens")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--labels", type=int, default=3000, help="labels kept per large list (artists, flavors)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="alchemy-bench-captioners-"))
    try:
        blip_dir, clip_dir = make_blip(work / "blip"), make_clip(work / "clip")
        images = make_images(work / "images", args.images, 0)
        loop_t, our_t = [], []
        for r in range(args.repeats):
            for variant in (("loop", "ours") if r % 2 == 0 else ("ours", "loop")):
                start = time.perf_counter()
                if variant == "loop":
                    expected = per_image_loop(blip_dir, images, args.length)
                    loop_t.append(time.perf_counter() - start)
                else:
                    summary = ours(blip_dir, images, work / "cache", args.length, args.batch)
                    our_t.append(time.perf_counter() - start)
        same = all(summary.captions[str(images / name)] == text for name, text in expected.items())
        lm, om = statistics.median(loop_t), statistics.median(our_t)
        print(f"BLIP ({args.images} images, {args.length} tokens, {args.threads} threads; medians of {args.repeats}):")
        print(f"  per-image loop (reference tools' way): {lm:.2f}s  {args.images / lm:.2f} img/s")
        print(f"  caption_directory, batch {args.batch}:         {om:.2f}s  {args.images / om:.2f} img/s")
        print(f"  speed-up batched / per-image: {lm / om:.2f}x  (same captions: {same})")

        from extensions_lib.captioners.labels import LIST_FILES, shipped_lists_dir

        labels = work / "labels"
        labels.mkdir()
        for name in LIST_FILES:
            lines = (shipped_lists_dir() / f"{name}.txt").read_text(encoding="utf-8").splitlines()
            (labels / f"{name}.txt").write_text("\n".join(lines[:args.labels]), encoding="utf-8")
        cold_t, tables_t, warm_t = [], [], []
        for r in range(args.repeats):
            cache = work / f"clip-cache-{r}"
            start = time.perf_counter()
            cold = clip_run(clip_dir, images, cache, labels)
            cold_t.append(time.perf_counter() - start)
            fresh = make_images(work / f"new-{r}", args.images, r + 1)
            start = time.perf_counter()
            clip_run(clip_dir, fresh, cache, labels)
            tables_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            warm = clip_run(clip_dir, images, cache, labels)
            warm_t.append(time.perf_counter() - start)
            shutil.rmtree(fresh)
        same = cold.captions == warm.captions
        c, t, w = (statistics.median(x) for x in (cold_t, tables_t, warm_t))
        n_labels = 2 * min(args.labels, 5265) + min(args.labels, 100970) + 95 + 200 + 72
        print(f"CLIP interrogator, fast mode ({args.images} images, {n_labels} labels; medians of {args.repeats}):")
        print(f"  cold (empty cache):                {c:.2f}s")
        print(f"  label tables cached, new images:   {t:.2f}s   cold/this = {c / t:.1f}x")
        print(f"  warm re-run (everything cached):   {w:.2f}s   cold/warm = {c / w:.1f}x  (same prompts: {same})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
