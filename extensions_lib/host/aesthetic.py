"""Aesthetic gradients in the WebUI: the always-visible txt2img/img2img script's logic and its one patch.

During a generation with an embedding chosen, two methods of the current ``cond_stage_model`` (the host's
prompt wrapper, SD1 or SD2) are wrapped on that object only (:class:`~extensions_lib.aesthetic.patch.
MethodPatches`): ``forward(texts)`` notes whether the texts being encoded are the negative prompt, and
``encode_with_transformers(tokens)`` blends each 77-token chunk's conditioning with its personalised one
(:mod:`extensions_lib.aesthetic.personalise`). The host's own code still builds the chunks, applies
emphasis, Clip skip and textual-inversion vectors (read back from ``hijack.fixes`` for the personalised
tower); hypernetworks act on the UNet and are untouched. ``postprocess`` (and a model change, scripts
unloading, a training job) takes the patch off again, after which encoding is the host's, bit for bit.

The host caches conditioning in lists shared by every job, keyed without our options; a generation that
personalises gets lists of its own, so personalised conditioning never leaks into a later plain run and
a plain one is never reused for a personalised run. Repeats cost nothing anyway: ours is cached per
chunk, model, embedding and options.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..aesthetic.file import AestheticEmbedding, AestheticLibrary
from ..aesthetic.options import NONE, AestheticOptions, INFOTEXT_FIELDS
from ..aesthetic.patch import MethodPatches
from ..aesthetic.personalise import Personaliser, Settings
from ..aesthetic.towers import HFTextTower, OpenClipTextTower, TextTower
from ..errors import AlchemyError
from .webui_adapter import model_family

log = logging.getLogger(__name__)
HOST_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def script_arg_names() -> list[str]:
    """The order of the script's arguments: the embedding dropdown, then each UI option as declared."""
    from ..options import specs

    return ["embedding", *(spec.name for spec in specs(AestheticOptions) if spec.ui)]


@dataclass
class _Generation:
    p: Any
    tower: TextTower
    embedding: AestheticEmbedding
    settings: Settings
    model_key: tuple
    clip_skip: int
    text_ids: list[int] | None

    def is_negative(self, texts: list[str]) -> bool:
        """Whether `texts` are the job's negative prompts (and none of its prompts). Texts are compared as the
        host hands them to the encoder, so a negative prompt with scheduling syntax (``[a:b:0.5]``) reaches
        it in pieces that are not recognised, and is personalised."""
        p = self.p
        negatives = {*(getattr(p, "all_negative_prompts", None) or ()), *(getattr(p, "negative_prompts", None) or ())}
        positives = {*(getattr(p, "all_prompts", None) or ()), *(getattr(p, "prompts", None) or ())}
        return bool(texts) and all(t in negatives and t not in positives for t in texts)


class AestheticWiring:
    """folder() / clip_dir(): our aesthetic-embeddings and CLIP-models folders. opts(): the host's
    ``shared.opts``. model_token(): identity of the current model (changes on reload)."""

    def __init__(self, folder: Callable[[], Path], clip_dir: Callable[[], Path], opts: Callable[[], Any],
                 model_token: Callable[[], tuple]):
        self._folder = folder
        self._clip_dir = clip_dir
        self._opts = opts
        self._model_token = model_token
        self.personaliser = Personaliser()
        self._patches = MethodPatches()
        self._generation: _Generation | None = None
        self._negative_now = False
        self._libraries: dict[Path, AestheticLibrary] = {}
        self._projections: dict[tuple, Any] = {}

    # --- listing ---------------------------------------------------------------------------------------
    def library(self) -> AestheticLibrary:
        folder = Path(self._folder())
        if folder not in self._libraries:
            self._libraries[folder] = AestheticLibrary(folder)
        return self._libraries[folder]

    def choices(self) -> list[str]:
        return [NONE, *self.library().usable()]

    # --- per generation ------------------------------------------------------------------------------
    def process(self, p: Any, options: AestheticOptions) -> None:
        if not options.enabled:
            self.undo()
            return
        sd_model = p.sd_model
        cond = sd_model.cond_stage_model
        embedding = self.library().load(options.embedding)
        tower = self._tower(sd_model, cond)
        settings = options.settings()
        text_ids = cond.tokenize([settings.text])[0] if settings.text else None
        self.personaliser.target(tower, embedding, settings, text_ids)  # a width mismatch stops here, clearly
        if not self._patches.owns(cond):
            self.undo()
            self._patches.wrap(cond, "forward", self._wrap_forward)
            self._patches.wrap(cond, "encode_with_transformers", lambda original: self._wrap_encode(cond, original))
        opts = self._opts()
        clip_skip = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1) if tower.family == "sd1" else 1
        self._generation = _Generation(p, tower, embedding, settings,
                                       ("webui", getattr(sd_model, "sd_model_hash", None), *self._model_token()),
                                       clip_skip, text_ids)
        for name in HOST_CACHES:
            if hasattr(p, name):
                setattr(p, name, [None, None])
        params = getattr(p, "extra_generation_params", None)
        if isinstance(params, dict):
            params.update({k: v for k, v in options.infotext(embedding.digest).items() if v is not None})

    def undo(self) -> None:
        self._patches.undo()
        self._generation = None
        self._negative_now = False

    @property
    def patched(self) -> bool:
        return self._patches.active

    # --- the wrappers ----------------------------------------------------------------------------------
    def _wrap_forward(self, original: Callable) -> Callable:
        def forward(texts, *args, **kwargs):
            generation = self._generation
            before = self._negative_now
            self._negative_now = generation is not None and generation.settings.leave_negative and \
                generation.is_negative(list(texts))
            try:
                return original(texts, *args, **kwargs)
            finally:
                self._negative_now = before
        return forward

    def _wrap_encode(self, cond: Any, original: Callable) -> Callable:
        def encode_with_transformers(tokens):
            hijack = getattr(cond, "hijack", None)
            fixes = getattr(hijack, "fixes", None)  # the host's embedding layer clears them when it reads them
            z = original(tokens)
            generation = self._generation
            if generation is None or self._negative_now:
                return z

            def embeds():
                if hijack is not None:
                    hijack.fixes = fixes
                try:
                    return generation.tower.embed(tokens)
                finally:
                    if hijack is not None:
                        hijack.fixes = None

            return self.personaliser.personalise(
                generation.tower, tokens, z, embeds, embedding=generation.embedding, settings=generation.settings,
                model_key=generation.model_key, fixes=fixes, clip_skip=generation.clip_skip,
                text_ids=generation.text_ids)
        return encode_with_transformers

    # --- towers --------------------------------------------------------------------------------------
    def _tower(self, sd_model: Any, cond: Any) -> TextTower:
        family = model_family(sd_model)
        wrapped = getattr(cond, "wrapped", None)
        ids = dict(start=int(cond.id_start), end=int(cond.id_end), pad=int(cond.id_pad))
        if family == "sd2":
            return OpenClipTextTower(wrapped.model, **ids)
        if family == "sd1":
            return HFTextTower(wrapped.transformer, "sd1", self._sd1_projection(), **ids)
        raise AlchemyError("aesthetic gradients work with SD1.x and SD2.x models, not SDXL",
                           fix="load an SD1.x or SD2.x checkpoint, or set the aesthetic embedding to None")

    def _sd1_projection(self):
        from ..aesthetic.clip_models import load_text_projection, resolve_clip

        path = resolve_clip("", "sd1", self._clip_dir())
        stamp = tuple((f.name, f.stat().st_mtime_ns) for f in sorted(path.iterdir())) if path.is_dir() else \
            (path.stat().st_mtime_ns,)
        key = (str(path), stamp)
        if key not in self._projections:
            self._projections = {key: load_text_projection(path)}
        return self._projections[key]


# ---- the script's UI ----------------------------------------------------------------------------------------

def build_script_ui(wiring: AestheticWiring, is_img2img: bool) -> tuple[list, list[tuple[Any, str]]]:
    """The accordion of the original ("Open for Clip Aesthetic!") rendered from :class:`AestheticOptions`.

    Returns (components in :func:`script_arg_names` order, infotext fields for paste-back)."""
    import gradio as gr

    from ..ui.forms import render_options

    tab = "img2img" if is_img2img else "txt2img"
    with gr.Accordion("Alchemy: Aesthetic Gradients", open=False, elem_id=f"alchemy_aesthetic_{tab}"):
        with gr.Row():
            embedding = gr.Dropdown(label="Aesthetic imgs embedding", choices=wiring.choices(), value=NONE,
                                    elem_id=f"alchemy_aesthetic_{tab}_embedding")
            refresh = gr.Button("Refresh", elem_id=f"alchemy_aesthetic_{tab}_refresh")
        form = render_options(AestheticOptions, elem_prefix=f"alchemy_aesthetic_{tab}")
    refresh.click(fn=lambda: gr.update(choices=wiring.choices()), inputs=[], outputs=[embedding])
    components = [embedding, *form.inputs]
    names = ["embedding", *form.names]
    assert names == script_arg_names(), names
    by_name = dict(zip(names, components))
    fields = [(by_name[name], key) for key, name in INFOTEXT_FIELDS.items() if name in by_name]
    return components, fields


def options_from_args(args) -> AestheticOptions:
    """The script's arguments (in :func:`script_arg_names` order) as options."""
    from ..options import from_ui_values

    return from_ui_values(AestheticOptions, script_arg_names(), list(args))
