"""Aesthetic Gradients: what applying an aesthetic embedding costs per generation, CPU.

A full-size SD1.5-architecture checkpoint with random weights is written to a real fp16 safetensors file
(``--ckpt`` reuses one) and loaded by the standalone loader; generations run through ``generate_from``
with the same :class:`~extensions_lib.commands.aesthetic.Txt2ImgAesthetic` wrapper ``alchemy txt2img
--aesthetic`` builds (embedding read from a real ``.pt``; SD1's CLIP text projection from a CLIP folder
holding just that tensor, the only one applying reads).

(a) Repeat: a second generation with the same prompt and options (personalised conditioning served from
    the cache, no optimisation) against a plain generation, alternating ABBA, medians. Target <= 1.02x.
(b) First generation: its extra time over a plain one (one prompt chunk personalised, the negative left
    alone by default), printed next to the original extension's recipe measured here on a CLIP
    ViT-L/14-sized ``CLIPModel`` with random weights: per chunk ``copy.deepcopy`` of the full CLIP, Adam
    over ``text_model`` for the same steps, the final hidden states; the original ran it for the prompt
    and the negative prompt, so twice per single-chunk generation.

Run alone (benchmarks share the lock):

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_aesthetic.py
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

TARGET = 1.02


def write_projection_folder(folder: Path, width: int = 768, dim: int = 768) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": dim}))
    weight = torch.randn(dim, width, generator=torch.Generator().manual_seed(1)) / width ** 0.5
    save_file({"text_projection.weight": weight}, str(folder / "model.safetensors"))
    return folder


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def original_recipe(steps: int, lr: float, chunks: int, tiny: bool = False) -> float:
    """Median seconds of the original's per-chunk work on a ViT-L/14-sized CLIPModel (random weights)."""
    from transformers import CLIPConfig, CLIPModel

    if tiny:  # a smoke test of this script only
        config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                             num_hidden_layers=2),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                               num_hidden_layers=2, image_size=28, patch_size=14), projection_dim=768)
    else:
        config = CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             max_position_embeddings=77),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                               patch_size=14, image_size=224),
            projection_dim=768)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    target = torch.nn.functional.normalize(torch.randn(1, 768), dim=-1)
    tokens = torch.tensor([[49406] + list(range(400, 420)) + [49407] * 56])

    def chunk():
        model = copy.deepcopy(clip)
        model.text_model.requires_grad_(True)
        optimiser = torch.optim.Adam(model.text_model.parameters(), lr=lr)
        for _ in range(steps):
            features = model.get_text_features(input_ids=tokens)
            loss = -torch.nn.functional.cosine_similarity(features, target).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            model.text_model(input_ids=tokens).last_hidden_state
        del model, optimiser
        gc.collect()

    chunk()
    return statistics.median(timed(chunk) for _ in range(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="an SD1.5-architecture .safetensors to use (default: write one)")
    parser.add_argument("--size", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--runs", type=int, default=6, help="timed runs per side (default 6)")
    parser.add_argument("--aesthetic-steps", type=int, default=5, help="personalisation steps (default 5, the original's)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test this script on the tiny test model")
    args = parser.parse_args()

    from bench_load import write_random_checkpoint

    from extensions_lib.aesthetic.file import save_aesthetic
    from extensions_lib.aesthetic.options import AestheticOptions
    from extensions_lib.backend.standalone import load_model
    from extensions_lib.commands.aesthetic import Txt2ImgAesthetic
    from extensions_lib.sampling.txt2img import GenerationOptions, encode_pair, generate_from

    with tempfile.TemporaryDirectory(prefix="alchemy-bench-aesthetic-") as tmp:
        work = Path(tmp)
        ckpt = args.ckpt
        if ckpt is None and args.tiny:
            from extensions_lib.backend.tiny import make_tiny_checkpoint

            ckpt = make_tiny_checkpoint(work / "tiny-sd1.safetensors")
        elif ckpt is None:
            ckpt = work / "random-sd15.safetensors"
            print(f"writing {ckpt} ...", flush=True)
            write_random_checkpoint(ckpt)
        clip = write_projection_folder(work / "clip", width=32 if args.tiny else 768)
        save_aesthetic(torch.randn(768, generator=torch.Generator().manual_seed(2)), work / "aesthetic" / "style.pt")
        adapter = load_model(ckpt)
        adapter.checkpoint_hash  # noqa: B018 — hashed once up front, as any generation's infotext does
        opts = GenerationOptions(prompt="a castle on a hill, oil painting", negative="blurry", steps=args.steps,
                                 width=args.size, height=args.size, seed=1)
        options = AestheticOptions(steps=args.aesthetic_steps)
        aesthetic = Txt2ImgAesthetic(adapter, "style", options, work / "aesthetic", str(clip))
        personaliser = aesthetic.aesthetic.personaliser

        def plain():
            generate_from(adapter, opts)

        def personalised():
            with aesthetic:
                generate_from(adapter, opts, encode_fn=aesthetic.encode_fn(None, opts.negative),
                              extra_params=aesthetic.infotext())

        print("generating (warm-up, first, then alternating) ...", flush=True)
        plain()                                  # warm-up
        first_plain = statistics.median(timed(plain) for _ in range(2))
        first = timed(personalised)
        optimised = personaliser.optimisations
        times = {plain: [], personalised: []}
        for i in range(args.runs):
            for fn in ((plain, personalised) if i % 2 == 0 else (personalised, plain)):
                times[fn].append(timed(fn))
        assert personaliser.optimisations == optimised, "a repeat ran an optimisation"
        plain_s, repeat_s = statistics.median(times[plain]), statistics.median(times[personalised])
        overhead = first - first_plain

        # the first generation's extra work alone, repeated with the cache emptied each time (less noisy)
        def encode_plain():
            with torch.no_grad():
                encode_pair(adapter, opts.prompt, opts.negative, opts.clip_skip)

        def encode_cold():
            personaliser.clear()
            with aesthetic, torch.no_grad():
                encode_pair(adapter, opts.prompt, opts.negative, opts.clip_skip,
                            aesthetic.encode_fn(None, opts.negative))

        print(f"plain {plain_s:.2f} s, repeat {repeat_s:.2f} s; timing cold personalisation ...", flush=True)
        def encode_hit():
            with aesthetic, torch.no_grad():
                encode_pair(adapter, opts.prompt, opts.negative, opts.clip_skip,
                            aesthetic.encode_fn(None, opts.negative))

        encode_times = {encode_plain: [], encode_cold: []}
        for i in range(3):
            for fn in ((encode_plain, encode_cold) if i % 2 == 0 else (encode_cold, encode_plain)):
                encode_times[fn].append(timed(fn))
        cold = statistics.median(encode_times[encode_cold]) - statistics.median(encode_times[encode_plain])
        # the cached path's own cost, where it happens (text encoding), many short runs side by side
        hit_times = {encode_plain: [], encode_hit: []}
        for i in range(4 * args.runs):
            for fn in ((encode_plain, encode_hit) if i % 2 == 0 else (encode_hit, encode_plain)):
                hit_times[fn].append(timed(fn))
        hit_extra = statistics.median(hit_times[encode_hit]) - statistics.median(hit_times[encode_plain])
        del adapter, aesthetic
        gc.collect()
        print("timing the original's recipe ...", flush=True)
        recipe = original_recipe(args.aesthetic_steps, options.lr, chunks=3, tiny=args.tiny)

    ratio = repeat_s / plain_s
    print(f"\n{'TINY smoke test' if args.tiny else 'SD1.5 architecture'}, {args.size}x{args.size}, {args.steps} sampling steps, CPU x{torch.get_num_threads()}, "
          f"aesthetic steps {args.aesthetic_steps}")
    print(f"(a) plain generation           {plain_s:8.3f} s (median of {args.runs})")
    print(f"    repeat, same prompt+options {repeat_s:8.3f} s  ratio {ratio:.4f}  (target <= {TARGET})  "
          f"{'OK' if ratio <= TARGET else 'MISSED'}")
    print(f"    cache hit, text encoding    {hit_extra * 1000:8.2f} ms extra per generation (median of {4 * args.runs} "
          f"side-by-side encodes): {(plain_s + hit_extra) / plain_s:.4f}x a plain generation")
    print(f"(b) first generation overhead  {overhead:8.3f} s  (one generation; {optimised} chunk optimised, negative "
          "left alone)")
    print(f"    personalisation alone       {cold:8.3f} s  (median of 3 cold encodes minus plain encodes)")
    print(f"    original recipe per chunk  {recipe:8.3f} s  (deepcopy of full CLIP + {args.aesthetic_steps} Adam steps)")
    print(f"    original per generation    {2 * recipe:8.3f} s  (prompt + negative), every generation, no cache")
    print(f"    ours / original (first)    {cold / (2 * recipe):8.3f}  (personalisation alone vs the original's)")
    print("\nrerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_aesthetic.py")


if __name__ == "__main__":
    main()
