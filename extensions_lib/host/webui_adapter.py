"""The :class:`~extensions_lib.adapter.ModelAdapter` over the WebUI's loaded model (``shared.sd_model``).

SD1 and SD2 are fully supported (text encoding, VAE, UNet, attention layers); for SDXL the adapter
describes the model and its two text encoders (enough to check and list embeddings, which the host's
own database loads) and refuses the rest with a clear message.

Offloading (``--medvram``/``--lowvram``): the host keeps parts in CPU memory and moves one at a time to
the GPU from a forward-pre-hook named ``send_me_to_gpu``. Every call here goes through a module call that
triggers those hooks, with inputs moved to the compute device first; :meth:`WebUIModelAdapter.use` and
reading :attr:`WebUIModelAdapter.text_encoders` run the host's hook for those parts, so code reading
weights directly (initialisation text) finds them on the device.

Model switches: the host fires ``on_model_loaded`` when it builds a model or swaps weights into one, but
not when it switches to a model kept in its RAM cache. :class:`ModelWatch` counts the callbacks and
compares the model object at each use, so an adapter (or a training job) never silently works on a
model that is no longer the current one.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapter import LatentDistribution, TextEncoderInfo
from ..errors import AlchemyError
from .ldm_text import encode_clip_chunks, encode_open_clip_chunks

PARTS = ("unet", "vae", "text_encoder")
PLACEMENT_HOOK = "send_me_to_gpu"
"""Name of the host's offloading forward-pre-hook (``modules/lowvram.py``)."""
NO_MODEL_FIX = "choose a checkpoint at the top of the WebUI and wait until it has loaded"


class NoModelLoaded(AlchemyError):
    def __init__(self):
        super().__init__("no Stable Diffusion checkpoint is loaded", fix=NO_MODEL_FIX)


class UnsupportedModel(AlchemyError):
    pass


def model_family(sd_model: Any) -> str:
    """"sd1", "sd2" or "sdxl" from the flags the host sets (or, on hosts without them, the encoder's shape)."""
    if getattr(sd_model, "is_sd3", False):
        raise UnsupportedModel("SD3 checkpoints are not supported by Alchemy", fix="load an SD1.x, SD2.x or SDXL checkpoint")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    cond = getattr(sd_model, "cond_stage_model", None)
    if cond is None:
        raise UnsupportedModel("the loaded model has no text encoder (cond_stage_model) Alchemy knows",
                               fix="load an SD1.x or SD2.x checkpoint")
    if getattr(sd_model, "is_sd2", False) or hasattr(getattr(cond, "wrapped", cond), "model"):
        return "sd2"
    return "sd1"


def innermost_embedding(module: nn.Module) -> nn.Module:
    """The ``nn.Embedding`` under the host's (and any other) ``.wrapped`` layers around a token embedding."""
    seen = 0
    while not isinstance(module, nn.Embedding) and hasattr(module, "wrapped") and seen < 8:
        module, seen = module.wrapped, seen + 1
    return module


def run_placement_hook(root: nn.Module) -> bool:
    """Run the host's ``send_me_to_gpu`` pre-hook of the first module under `root` that has one.

    Returns whether one ran. Only the host's placement hook is called, never other pre-hooks.
    """
    for module in root.modules():
        for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
            if getattr(hook, "__name__", "") == PLACEMENT_HOOK:
                hook(module, None)
                return True
    return False


WRAPPER_LEVEL = "wrapped"
"""The attribute the host's hijack wrappers keep the wrapped module under."""


def unwrapped_key(key: str) -> str:
    """A state-dict key of the hijacked model without the wrappers' levels: ``cond_stage_model.wrapped.
    transformer....token_embedding.wrapped.weight`` -> ``cond_stage_model.transformer....token_embedding.weight``."""
    return ".".join(p for p in key.split(".") if p != WRAPPER_LEVEL)


def _dtype_of(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default


class WebUIModelAdapter:
    """A :class:`~extensions_lib.adapter.ModelAdapter` over one host model object.

    sd_model: ``shared.sd_model``. device: the host's ``devices.device`` (where computation runs even when
    parts wait in CPU memory).
    """

    def __init__(self, sd_model: Any, device: torch.device | str):
        self.sd_model = sd_model
        self.device = torch.device(device)
        self.family = model_family(sd_model)
        self.prediction_type = "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"
        self.moves_parts = bool(getattr(sd_model, "lowvram", False))  # --medvram and --lowvram both set it
        cond = sd_model.conditioner if self.family == "sdxl" else sd_model.cond_stage_model
        self._cond = cond
        self._wrapped = getattr(cond, "wrapped", cond)
        self._encoders = self._text_encoders()
        self.context_dim = 2048 if self.family == "sdxl" else self._encoders[0].width
        self.vae_scale_factor = float(getattr(sd_model, "scale_factor", 0.18215))

    # --- identity ------------------------------------------------------------------------------------
    @property
    def checkpoint_name(self) -> str:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        if info is not None and getattr(info, "model_name", None):
            return str(info.model_name)
        path = getattr(self.sd_model, "sd_model_checkpoint", None)
        return Path(path).stem if path else ""

    @property
    def checkpoint_hash(self) -> str:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        value = getattr(info, "shorthash", None) or getattr(self.sd_model, "sd_model_hash", None)
        return str(value) if value else ""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule: the host may rescale ``alphas_cumprod`` for sampling settings, but keeps
        the checkpoint's own in ``alphas_cumprod_original``."""
        original = getattr(self.sd_model, "alphas_cumprod_original", None)
        source = original if original is not None else self.sd_model.alphas_cumprod
        return source.detach().to("cpu", torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        return _dtype_of(self.sd_model.model)

    # --- text ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The host's prompt wrapper: its ``tokenize(texts)`` gives ids without start/end, untruncated."""
        tokenizer = self._cond if hasattr(self._cond, "tokenize") else None
        if tokenizer is None:
            raise UnsupportedModel("this WebUI's text encoder wrapper has no tokenize()",
                                   fix="use AUTOMATIC1111 WebUI 1.x; other hosts are not supported for this")
        return tokenizer

    @property
    def text_encoders(self) -> list[TextEncoderInfo]:
        """The encoders, their token embeddings brought to the device first when the host offloads: code
        that reads token vectors (initialisation text) through here never sees a parked copy."""
        if self.moves_parts:
            run_placement_hook(self.modules()["text_encoder"])
        return self._encoders

    def _text_encoders(self) -> list[TextEncoderInfo]:
        if self.family == "sdxl":
            infos = []
            for embedder in self._cond.embedders:
                wrapped = getattr(embedder, "wrapped", embedder)
                key = getattr(embedder, "textual_inversion_key", None)
                if hasattr(wrapped, "transformer"):
                    module = wrapped.transformer.text_model.embeddings.token_embedding
                    key = key or "clip_l"
                elif hasattr(wrapped, "model"):
                    module = wrapped.model.token_embedding
                    key = key or "clip_g"
                else:
                    continue
                infos.append(self._info(key, module, embedder))
            return infos
        if self.family == "sd2":
            return [self._info("", self._wrapped.model.token_embedding, self._cond, id_pad=0)]
        return [self._info("", self._wrapped.transformer.text_model.embeddings.token_embedding, self._cond)]

    @staticmethod
    def _info(key: str, module: nn.Module, wrapper: Any, id_pad: int | None = None) -> TextEncoderInfo:
        inner = innermost_embedding(module)
        defaults = TextEncoderInfo(key="", width=0, token_embedding=inner)
        pad = getattr(wrapper, "id_pad", None)
        return TextEncoderInfo(
            key=key, width=int(inner.embedding_dim), token_embedding=inner,
            id_start=int(getattr(wrapper, "id_start", None) or defaults.id_start),
            id_end=int(getattr(wrapper, "id_end", None) or defaults.id_end),
            id_pad=int(pad if pad is not None else (id_pad if id_pad is not None else defaults.id_pad)),
            comma_token=int(getattr(wrapper, "comma_token", None) or defaults.comma_token))

    def _refuse_sdxl(self, what: str) -> None:
        if self.family == "sdxl":
            raise UnsupportedModel(f"{what} on SDXL is not supported inside the WebUI yet",
                                   fix="SDXL embeddings still load through the WebUI; train on an SD1.x/SD2.x checkpoint")

    def encode_token_chunks(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        self._refuse_sdxl("text encoding")
        if self.family == "sd2":
            return encode_open_clip_chunks(self._wrapped, tokens, clip_skip, self.device)
        return encode_clip_chunks(self._wrapped, tokens, clip_skip, self.device)

    # --- latents -------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> LatentDistribution:
        self._refuse_sdxl("VAE encoding")
        dtype = _dtype_of(self.sd_model.first_stage_model)
        dist = self.sd_model.encode_first_stage(images.to(self.device, dtype))
        if isinstance(dist, torch.Tensor):  # a first stage without a distribution: already the latent
            return LatentDistribution(mean=dist, std=torch.zeros_like(dist), scale=self.vae_scale_factor)
        return LatentDistribution(mean=dist.mean, std=dist.std, scale=self.vae_scale_factor)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Through ``first_stage_model.decode`` (not ldm's ``decode_first_stage``, which is ``no_grad``):
        methods that backpropagate through the decoder need the gradient."""
        self._refuse_sdxl("VAE decoding")
        vae = self.sd_model.first_stage_model
        return vae.decode(latents.to(self.device, _dtype_of(vae)) / self.vae_scale_factor)

    # --- denoiser ------------------------------------------------------------------------------------
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self._refuse_sdxl("the UNet")
        dtype = self.dtype
        timesteps = torch.as_tensor(timesteps, device=self.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        return self.sd_model.apply_model(noisy_latents.to(self.device, dtype), timesteps,
                                         cond.to(self.device, dtype))

    def ldm_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The loaded model's weights under the keys of a WebUI single-file checkpoint, tensor by tensor.

        ldm's modules already carry those names; only the host's hijack wrappers add a ``wrapped.`` level
        (the prompt wrapper around ``cond_stage_model``, ``EmbeddingsWithFixes`` around the token embedding),
        which its own loader never sees because it loads with the hijack undone. The schedule is written as
        the checkpoint had it (``alphas_cumprod_original``), not as a sampling setting may have rescaled it.
        """
        self._refuse_sdxl("writing a checkpoint")
        original = getattr(self.sd_model, "alphas_cumprod_original", None)
        for key, tensor in self.sd_model.state_dict().items():
            key = unwrapped_key(key)
            if key == "alphas_cumprod" and isinstance(original, torch.Tensor):
                tensor = original
            yield key, tensor

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        root = self.sd_model.model.diffusion_model
        return [(name, m) for name, m in root.named_modules()
                if isinstance(getattr(m, "to_k", None), nn.Linear) and isinstance(getattr(m, "to_v", None), nn.Linear)]

    def own_weights(self) -> contextlib.AbstractContextManager:
        """The checkpoint's own weights inside the block: the Lora extension's merged networks undone and
        kept from re-merging (:mod:`.merged_networks`); it applies them afresh at the next generation."""
        from .merged_networks import own_weights

        return own_weights(self.sd_model)

    # --- placement -----------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        if self.family == "sdxl":
            return {"unet": self.sd_model.model, "vae": self.sd_model.first_stage_model,
                    "text_encoder": self.sd_model.conditioner}
        return {"unet": self.sd_model.model, "vae": self.sd_model.first_stage_model,
                "text_encoder": self.sd_model.cond_stage_model}

    @contextlib.contextmanager
    def use(self, *parts: str) -> Iterator[None]:
        """With offloading, ask the host to bring `parts` to the device (the last one named ends up there for
        sure: the host keeps one part at a time). Without offloading everything already is."""
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {PARTS}")
        if self.moves_parts:
            modules = self.modules()
            for part in parts:
                run_placement_hook(modules[part])
        yield


class ModelWatch:
    """Which model is current, noticed at every use.

    current_model: returns the host's model object *without* loading one (``sd_models.model_data.sd_model``),
    or None. :meth:`model_loaded` is the ``on_model_loaded`` callback. :meth:`token` identifies the model as
    it is now; :meth:`changed` says how (if at all) it differs from an earlier token.
    """

    def __init__(self, current_model: Callable[[], Any], device: Callable[[], torch.device] | torch.device):
        self._current_model = current_model
        self._device = device
        self.generation = 0
        self._adapter: WebUIModelAdapter | None = None
        self._adapter_token: tuple | None = None
        self.listener: Callable[[tuple[int, int]], None] | None = None
        """Told the model's token whenever :meth:`adapter` hands it out (a running job binds to it)."""

    def model_loaded(self, sd_model: Any = None) -> None:
        self.generation += 1
        self._adapter = None

    def model(self) -> Any:
        model = self._current_model()
        if model is None:
            raise NoModelLoaded()
        return model

    def token(self) -> tuple[int, int]:
        return id(self.model()), self.generation

    def changed(self, token: tuple[int, int]) -> str | None:
        """None while the same model (same object, no reload since) is current; else what happened."""
        try:
            model = self._current_model()
        except Exception:  # noqa: BLE001 — a host in the middle of loading
            model = None
        if model is None:
            return "the checkpoint was unloaded"
        if id(model) != token[0]:
            return "another checkpoint was selected"
        if self.generation != token[1]:
            return "the checkpoint was reloaded"
        return None

    def adapter(self) -> WebUIModelAdapter:
        """The adapter for the current model, rebuilt whenever the model changed (cheap: no weights read)."""
        model = self.model()
        token = (id(model), self.generation)
        if self._adapter is None or self._adapter_token != token or self._adapter.sd_model is not model:
            device = self._device() if callable(self._device) else self._device
            self._adapter = WebUIModelAdapter(model, device)
            self._adapter_token = token
        if self.listener is not None:
            self.listener(token)
        return self._adapter
