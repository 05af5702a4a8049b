"""Textual-inversion training inside the WebUI: Alchemy's step against the host's own, in the stand-in host.

The host is ``tests/webui_standin`` with the real LDM module layout (``ldm_standin``: ``LatentDiffusion``
with ``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model`` behind the host's prompt
wrapper and ``EmbeddingsWithFixes``), loaded from a real SD1.5-architecture checkpoint file with random
weights (written once to ``--cache``, float16, about 2 GB). As in the real host, its UNet parameters are
left ``requires_grad=True`` (ldm freezes only the VAE and the text encoder).

- ours: Alchemy's embedding training as its Train tab and API run it in the host (``train_embedding`` on the
  extension's WebUI model adapter): the model frozen but for the vectors, latents cached once, the token
  rows and VAE kept out of the way, the lean frozen-layer backward. Step time = time between the loop's
  per-step progress callbacks.
- host: the WebUI v1.10.1 ``train_embedding`` loop restated (a1111-host.md 5.5): latents encoded once
  ("once"), ``vec.requires_grad = True`` and ``AdamW([vec], weight_decay=0)``, per step the prompt through
  ``sd_model.cond_stage_model`` (the host's wrapper injects the vectors), ``sd_model.forward(x, c)[0]``
  (ldm's loss, restated in ``webui_loops.ldm_loss``) under ``sd_hijack_checkpoint`` (gradient
  checkpointing of every transformer and resnet block), backward, step, ``zero_grad``. The UNet's weights
  keep requiring gradients, so every step computes them, as in the host.

Both sides train the same embedding file on the same one-image dataset and template ("a photo of
[name]"), batch 1, float32 on the CPU, alternating rounds in one process (same model object). Reported per
size: median step times and ours / host. Target: <= 0.5 at 64 px and at 256 px.

    flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_host_training.py

``--model tiny`` runs the same on the tiny test model in seconds (a check of the script only).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from webui_loops import host_checkpointing, ldm_loss  # noqa: E402

TARGET = 0.5
TOKEN = "benchtoken"
TEMPLATE = "a photo of [name]"


def write_checkpoint(model: str, cache: Path) -> Path:
    """A random-weight LDM-layout checkpoint of the SD1.5 architecture (or the tiny one), written once."""
    from bench_textual_inversion import build_parts
    from extensions_lib.backend import keymap
    from extensions_lib.backend.tiny import make_tiny_checkpoint

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"random-{model}.safetensors"
    if path.is_file():
        return path
    if model == "tiny":
        return make_tiny_checkpoint(path, "sd1")
    from safetensors.torch import save_file

    config, parts = build_parts(model)
    state = keymap.convert_diffusers_state_dicts({k: m.state_dict() for k, m in parts.items()},
                                                 keymap.Layout.from_config(config))
    del parts
    state = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    save_file(state, str(path) + ".tmp", metadata={"format": "pt"})
    Path(str(path) + ".tmp").rename(path)
    return path


def write_dataset(folder: Path, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    pixels = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "img.png")


def run_ours(adapter, options, steps: int) -> list[float]:
    from extensions_lib.embeddings.session import train_embedding

    marks: list[float] = []
    train_embedding(adapter, options, callbacks=lambda p: marks.append(time.perf_counter())
                    if p.loss is not None and p.saved is None else None)
    return [b - a for a, b in zip(marks, marks[1:])][-steps:]


def run_host(host, size: int, data: Path, steps: int, warmup: int) -> list[float]:
    """The WebUI's own TI loop (see the module docstring), `warmup` + `steps` steps; the timed ones back."""
    import numpy as np
    from PIL import Image

    sd_model = host.shared.sd_model
    db = host.sd_hijack.model_hijack.embedding_db
    db.load_textual_inversion_embeddings(force_reload=True)
    embedding = db.word_embeddings[TOKEN]
    embedding.vec.requires_grad = True
    optimizer = torch.optim.AdamW([embedding.vec], lr=0.005, weight_decay=0.0)
    pixels = np.asarray(Image.open(data / "img.png").convert("RGB").resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():  # "once": one latent sample per image, kept on the CPU
        latent = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(x)).cpu()
    text = TEMPLATE.replace("[name]", TOKEN)
    generator = torch.Generator().manual_seed(0)
    times = []
    with host_checkpointing(sd_model.model.diffusion_model):
        for i in range(warmup + steps):
            start = time.perf_counter()
            c = sd_model.cond_stage_model([text])
            loss = ldm_loss(sd_model, latent, c, generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    embedding.vec.requires_grad = False
    # The host never frees the UNet's gradients (3.4 GB at SD1.5 size); drop them here so they do not weigh
    # on the other side's run in this process (each side then starts as from a fresh host).
    for p in sd_model.model.diffusion_model.parameters():
        p.grad = None
    return times[warmup:]


def bench_size(host, extension, size: int, work: Path, rounds: int, steps: int, warmup: int) -> dict:
    from extensions_lib.embeddings.options import EmbeddingTrainOptions

    data = work / f"data-{size}"
    write_dataset(data, size)
    context = extension.context()
    adapter = context.model()
    options = EmbeddingTrainOptions(
        embedding_name=TOKEN, embeddings_dir=str(context.embeddings_dir), data_root=str(data),
        template_file=str(work / "template.txt"), training_width=size, training_height=size,
        steps=warmup + steps + 1, seed=0, learn_rate="0.005", save_every=0, create_image_every=0,
        write_csv_every=0, save_resume_state=False, save_training_settings=False, log_directory=str(work / "logs"))
    ours, theirs = [], []
    for r in range(rounds):
        sides = [("ours", lambda: ours.extend(run_ours(adapter, options, steps))),
                 ("host", lambda: theirs.extend(run_host(host, size, data, steps, warmup)))]
        for _name, side in (sides if r % 2 == 0 else sides[::-1]):
            side()
            gc.collect()
    unet = host.shared.sd_model.model.diffusion_model
    assert all(p.requires_grad for p in unet.parameters()), "ours must hand the UNet back as the host had it"
    return {"ours": ours, "host": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--sizes", default="64,256", help="training sizes in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first in each run")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "alchemy-bench-host"),
                        help="folder for the random checkpoint (kept between runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from extensions_lib.embeddings.create import create_embedding
    from webui_standin.harness import standin_host

    checkpoint = write_checkpoint(args.model, Path(args.cache))
    print(f"model {args.model} ({checkpoint}); torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
          f"batch 1, {args.rounds} alternating rounds x {args.steps} timed steps per side (after {args.warmup} warm-up)")
    ok = True
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        (work / "template.txt").write_text(TEMPLATE + "\n", encoding="utf-8")
        host = stack.enter_context(standin_host(work / "webui"))
        host.load_scripts()
        extension = next(m for _c, p, m in host.scripts.scripts_data if p.endswith("alchemy.py"))._extension
        host.load_model(checkpoint, cached=False)
        create_embedding(extension.context().model(), TOKEN, "*", 1, directory=extension.context().embeddings_dir)
        for size in (int(s) for s in args.sizes.split(",")):
            r = bench_size(host, extension, size, work, args.rounds, args.steps, args.warmup)
            ours, theirs = statistics.median(r["ours"]), statistics.median(r["host"])
            ratio = ours / theirs
            ok &= ratio <= TARGET
            print(f"    steps ours {[round(t, 2) for t in r['ours']]}, host {[round(t, 2) for t in r['host']]}")
            print(f"{size}x{size}: ours {ours:.3f} s/step (n={len(r['ours'])}, min {min(r['ours']):.3f}); "
                  f"host's loop {theirs:.3f} s/step (n={len(r['host'])}, min {min(r['host']):.3f}); "
                  f"ours/host {ratio:.3f}; target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}")
    rerun = " ".join(sys.argv[1:])
    print(f"rerun: flock /tmp/alchemy-bench.lock .venv/bin/python bench/bench_host_training.py {rerun}".rstrip())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
