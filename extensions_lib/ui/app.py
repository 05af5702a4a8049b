"""``alchemy ui``: the tab builders served on their own, on the standalone backend.

The app has a txt2img panel (to try embeddings and hypernetworks), the training sub-tabs and the dataset
tabs, all from the same builders the WebUI glue uses. Jobs run on a :class:`ThreadJobRunner`; the
browser polls their progress from :mod:`.routes`. Without ``--ckpt`` a tiny demo model is built once into
the cache folder (seconds, nothing downloaded).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..errors import AlchemyError
from ..jobs.context import UIContext
from ..jobs.progress import JobRunner

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_PATH = REPO_ROOT / "javascript" / "alchemy.js"
STYLE_PATH = REPO_ROOT / "style.css"
DEMO_CHECKPOINT = "tiny-sd1-demo.safetensors"


def demo_checkpoint(cache_dir: Path) -> Path:
    """The tiny demo checkpoint in `cache_dir`, built on first use."""
    from ..backend.tiny import make_tiny_checkpoint

    path = Path(cache_dir) / DEMO_CHECKPOINT
    if not path.is_file():
        make_tiny_checkpoint(path, family="sd1")
    return path


class ModelHolder:
    """Loads the checkpoint (or the demo model) on first use and keeps it; callable as ``UIContext.model``."""

    def __init__(self, ckpt: Path | None, cache_dir: Path, device: str = "auto"):
        if ckpt is not None and not Path(ckpt).is_file():
            raise AlchemyError("checkpoint not found", ckpt, "pass --ckpt path/to/model.safetensors, or leave it "
                                                             "out to use the tiny demo model")
        self.ckpt = Path(ckpt) if ckpt is not None else None
        self.cache_dir = Path(cache_dir)
        self.device = device
        self._lock = threading.Lock()
        self._model = None

    @property
    def is_demo(self) -> bool:
        return self.ckpt is None

    def __call__(self):
        with self._lock:
            if self._model is None:
                from ..backend.device import resolve_device
                from ..backend.standalone import load_model

                device = resolve_device(self.device)
                path = self.ckpt or demo_checkpoint(self.cache_dir)
                log.info("loading %s on %s", path, device)
                self._model = load_model(path, device=device)
            return self._model


def standalone_context(model: ModelHolder, data_dir: Path, tagger_models_dir: Path | None = None) -> UIContext:
    """Folders under `data_dir` (embeddings/, hypernetworks/, training logs), and small defaults when the
    model is the tiny demo one (its images are noise anyway, so make them fast)."""
    from ..sampling.txt2img import GenerationOptions

    data_dir = Path(data_dir)
    defaults = {}
    if model.is_demo:
        defaults[GenerationOptions] = GenerationOptions(width=128, height=128, steps=8)
        defaults.update(demo_training_defaults())
    return UIContext(model=model, embeddings_dir=data_dir / "embeddings", hypernetworks_dir=data_dir / "hypernetworks",
                     log_root=data_dir, tagger_models_dir=tagger_models_dir or Path("models") / "tagger",
                     cache_dir=model.cache_dir, defaults=defaults,
                     folders={"lora": data_dir / "Lora", "aesthetic_embeddings": data_dir / "aesthetic_embeddings",
                              "aesthetic_clip": Path("models") / "aesthetic_clip"})


def demo_training_defaults() -> dict:
    """Training options sized for the tiny demo model, for each registered training method."""
    from ..methods.registry import methods

    small = dict(training_width=64, training_height=64, steps=50, save_every=25, create_image_every=25,
                 write_csv_every=5)
    out = {}
    for method in methods():
        cls = method.train_options
        out[cls] = cls(**{k: v for k, v in small.items() if k in cls.__dataclass_fields__})
    return out


def read_asset(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        log.warning("%s not found: progress is shown only when a job ends", path)
        return None


def build_app(runner: JobRunner, context: UIContext, *, title: str = "Alchemy"):
    """The standalone gradio Blocks (not launched)."""
    import gradio as gr

    from . import build_dataset_tabs, build_train_tabs
    from .tab_txt2img import build_txt2img

    with gr.Blocks(analytics_enabled=False, title=title, css=read_asset(STYLE_PATH)) as demo:
        with gr.Tabs(elem_id="alchemy_tabs"):
            with gr.Tab("txt2img", id="alchemy_txt2img_tab", elem_id="alchemy_txt2img_tab"):
                build_txt2img(runner, context)
            with gr.Tab("Train", id="alchemy_train_tab", elem_id="alchemy_train_tab"):
                with gr.Tabs(elem_id="alchemy_train_tabs"):
                    build_train_tabs(runner, context)
            with gr.Tab("Dataset", id="alchemy_dataset_tab", elem_id="alchemy_dataset_tab"):
                with gr.Tabs(elem_id="alchemy_dataset_tabs"):
                    build_dataset_tabs(runner, context)
        script = read_asset(SCRIPT_PATH)
        if script:
            # Gradio 3 has no <head> hook: run the script once the page has loaded.
            demo.load(None, None, None, _js="() => {\n" + script + "\n}")
    return demo


def served_folders(context: UIContext) -> list[Path]:
    """The folders the app writes (training logs with their previews, embeddings, hypernetworks): the only
    files on disk its ``/file=`` route serves (besides gradio's own temporary and uploaded files)."""
    folders = [context.log_root, context.embeddings_dir, context.hypernetworks_dir]
    return list(dict.fromkeys(Path(f).resolve() for f in folders))


def _never_served(context: UIContext) -> list[str]:
    """Model files the app reads, blocked even when they lie inside a served folder."""
    paths = [getattr(context.model, "ckpt", None), context.cache_dir, context.tagger_models_dir]
    return [str(Path(p).resolve()) for p in paths if p is not None]


def _login_dependencies(app) -> list:
    """The login check gradio puts on its own routes (so our routes ask for the same login)."""
    for route in app.routes:
        if getattr(route, "path", None) == "/file={path_or_url:path}":
            return list(route.dependencies)
    raise RuntimeError("gradio's /file= route was not found; cannot guard the progress routes")


def launch(runner: JobRunner, context: UIContext, *, host: str = "127.0.0.1", port: int = 7861,
           block: bool = True, auth: list[tuple[str, str]] | None = None):
    """Serve the app; returns (demo, local url). With `block` it serves until Ctrl-C. `auth`: (user,
    password) pairs the browser must log in with."""
    from ..jobs.routes import add_progress_routes

    demo = build_app(runner, context)
    # Several workers: a click handler waits for its job while other events (refresh, a second start that
    # must be refused clearly) still need answering.
    demo.queue(concurrency_count=4)
    served = served_folders(context)
    app, local_url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=True,
                                    quiet=True, share=False, inbrowser=False, auth=auth or None,
                                    allowed_paths=[str(p) for p in served], blocked_paths=_never_served(context))
    # gradio 3.41's /file= route also serves every non-hidden file below the working directory (its
    # "app dir"); make that the app's own folder, so a checkpoint or notes beside it are not served.
    app.cwd = str(served[0])
    add_progress_routes(app, runner, dependencies=_login_dependencies(app))
    if block:
        demo.block_thread()
    return demo, local_url
