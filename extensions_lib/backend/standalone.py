"""The standalone model: diffusers/transformers modules loaded from a WebUI single-file checkpoint.

:func:`load_model` builds ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel`` from the
configs kept in the repo on the meta device (no random-init cost, no memory), then streams the
checkpoint in tensor by tensor through :mod:`.keymap`, so peak memory stays about one copy of the
weights. :class:`StandaloneModel` implements :class:`extensions_lib.adapter.ModelAdapter`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator

import torch

from ..adapter import LatentDistribution, TextEncoderInfo
from ..errors import AlchemyError
from .device import resolve_device
from . import keymap
from .checkpoint import Detected, detect, open_checkpoint, probe_is_v, short_hash
from .configs import ModelConfig, alphas_cumprod_from_schedule, build_modules, load_config

PARTS = ("unet", "vae", "text_encoder")


class StandaloneModel:
    """A loaded SD1/SD2 model behind the :class:`~extensions_lib.adapter.ModelAdapter` interface.

    All parameters are frozen (``requires_grad=False``); trainers unfreeze what they train. With
    ``offload=True`` parts stay on the CPU until :meth:`use` asks for them on ``device`` (and only
    :meth:`use` moves them then: it remembers where each part is).
    """

    def __init__(self, *, path: Path, config: ModelConfig, parts: dict[str, torch.nn.Module],
                 alphas_cumprod: torch.Tensor, device: torch.device, offload: bool = False,
                 extras: dict[str, torch.Tensor] | None = None):
        self.path = Path(path)
        self.config = config
        self.family = config.family
        self.prediction_type = config.prediction_type
        self.context_dim = int(config.unet["cross_attention_dim"])
        self.checkpoint_name = self.path.stem
        self.vae_scale_factor = float(config.scale_factor)
        self.alphas_cumprod = alphas_cumprod
        self.device = torch.device(device)
        self.moves_parts = bool(offload)
        self.unet = parts["unet"]
        self.vae = parts["vae"]
        self.text_encoder = parts["text_encoder"]
        self.extras = extras or {}
        """LDM tensors without a diffusers counterpart (schedule buffers, SD2 text projection; no EMA),
        kept so :meth:`ldm_state_dict` can write a complete single file."""
        self.compute_dtype: torch.dtype | None = None
        """Set when layers compute in another dtype than their weights are stored in (low-memory training)."""
        self._hash: str | None = None
        self._tokenizer = None
        self._placed: dict[str, torch.device] = {name: torch.device("cpu") for name in PARTS} if offload else {}
        self._in_use: list[frozenset[str]] = []
        """Parts each open :meth:`use` block asked for, outermost first."""
        embeddings = self.text_encoder.text_model.embeddings
        self.text_encoders = [TextEncoderInfo(key="", width=int(config.text_encoder["hidden_size"]),
                                              token_embedding=embeddings.token_embedding,
                                              id_pad=49407 if config.text_encoder_kind == "clip" else 0)]

    # --- identity --------------------------------------------------------------------------------------
    @property
    def checkpoint_hash(self) -> str:
        """sha256[:10] of the file, computed on first use (it reads the whole file)."""
        if self._hash is None:
            self._hash = short_hash(self.path) if self.path.is_file() else ""
        return self._hash

    @property
    def dtype(self) -> torch.dtype:
        return self._input_dtype(self.unet)

    def _input_dtype(self, module: torch.nn.Module) -> torch.dtype:
        return self.compute_dtype or next(module.parameters()).dtype

    # --- text ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import make_tokenizer

            self._tokenizer = make_tokenizer(self.config.text_encoder_kind)
        return self._tokenizer

    def encode_token_chunks(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        from .text_encoding import encode_chunks

        with self.use("text_encoder"):
            return encode_chunks(self.text_encoder, tokens, self.family, clip_skip)

    # --- latents ---------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> LatentDistribution:
        with self.use("vae"):
            param = next(self.vae.parameters())
            dist = self.vae.encode(images.to(param.device, self._input_dtype(self.vae))).latent_dist
            return LatentDistribution(mean=dist.mean, std=dist.std, scale=self.vae_scale_factor)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with self.use("vae"):
            param = next(self.vae.parameters())
            return self.vae.decode(latents.to(param.device, self._input_dtype(self.vae)) / self.vae_scale_factor).sample

    # --- denoiser --------------------------------------------------------------------------------------
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with self.use("unet"):
            param = next(self.unet.parameters())
            timesteps = torch.as_tensor(timesteps, device=param.device)
            if timesteps.ndim == 0:
                timesteps = timesteps.expand(noisy_latents.shape[0])
            dtype = self._input_dtype(self.unet)
            return self.unet(noisy_latents.to(param.device, dtype), timesteps,
                             encoder_hidden_states=cond.to(param.device, dtype)).sample

    def attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        from diffusers.models.attention_processor import Attention

        return [(name, m) for name, m in self.unet.named_modules() if isinstance(m, Attention)]

    def ldm_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights in LDM (WebUI single-file) layout plus :attr:`extras`, tensor by tensor.

        Call it with patches (embedding wrappers, hypernetworks) removed: their tensors have no LDM key.
        """
        layout = keymap.Layout.from_config(self.config)
        items = [(name, key, t) for name, module in self.modules().items() for key, t in module.state_dict().items()
                 if not key.endswith("embeddings.position_ids")]     # recomputed; the file's copy is an extra
        items += [(keymap.EXTRA, key, t) for key, t in self.extras.items()]
        return keymap.iter_diffusers_to_ldm(items, layout)

    # --- placement -------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @contextlib.contextmanager
    def use(self, *parts: str) -> Iterator[None]:
        """Have `parts` on ``device`` inside the block; with offloading, the others go to the CPU first."""
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {PARTS}")
        if not self.moves_parts:
            yield
            return
        # A nested block (predict() inside txt2img's use("unet"), a preview inside a training step) must not
        # evict what an enclosing block still uses; parts already in place are not touched, so the steady
        # state of a sampling or training loop moves nothing.
        needed = set(parts).union(*self._in_use)
        self._place({name: self.device if name in needed else torch.device("cpu") for name in PARTS})
        self._in_use.append(frozenset(parts))
        try:
            yield
        finally:
            self._in_use.pop()

    def _place(self, wanted: dict[str, torch.device]) -> None:
        modules = self.modules()
        # evict first, so the device never holds the old and the new parts at once
        for name in sorted(wanted, key=lambda n: wanted[n].type != "cpu"):
            if self._placed.get(name) != wanted[name]:
                modules[name].to(wanted[name])
                self._placed[name] = wanted[name]


# --- loading --------------------------------------------------------------------------------------------

def _candidate_configs(family: str, prediction_type: str | None) -> list[ModelConfig]:
    from .tiny import tiny_config

    base = load_config("sd2-v" if family == "sd2" and prediction_type == "v" else family)
    return [base, tiny_config(base)]


def choose_config(detected: Detected, path: Path) -> ModelConfig:
    """The repo config whose UNet and text widths match the checkpoint's tensors."""
    for config in _candidate_configs(detected.family, detected.prediction_type):
        if (config.unet["block_out_channels"][0] == detected.unet_channels
                and config.text_encoder["hidden_size"] == detected.text_width
                and config.unet["cross_attention_dim"] == detected.context_dim):
            # a yaml may declare v-prediction for an SD1 fine-tune too
            return config.with_prediction_type(detected.prediction_type or config.prediction_type)
    raise AlchemyError(
        f"unknown {detected.family} architecture: UNet width {detected.unet_channels}, text width "
        f"{detected.text_width}, context {detected.context_dim} match no known model", path,
        "choose a standard SD1.x or SD2.x checkpoint")


def _compute_dtype(requested: torch.dtype | None, device: torch.device, stored: torch.dtype) -> torch.dtype:
    if requested is not None:
        return requested
    if device.type == "cpu" or stored not in (torch.float16, torch.bfloat16):
        return torch.float32     # half-precision kernels are missing or slow on CPU
    return stored


def _build_on_meta(config: ModelConfig) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return build_modules(config)


def _assign(root: torch.nn.Module, key: str, tensor: torch.Tensor, path: Path, source_key: str) -> None:
    """Put `tensor` at diffusers `key` of `root`, checking it against the module's own shape and kind."""
    module_name, _, name = key.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or (name not in module._parameters and name not in module._buffers):
        raise AlchemyError(f"unexpected tensor {source_key}", path,
                           "the file is not a standard SD1.x/SD2.x checkpoint")
    current = module._parameters.get(name)
    if current is None:
        current = module._buffers[name]
    if tuple(current.shape) != tuple(tensor.shape):
        raise AlchemyError(f"wrong shape for {source_key}: {list(tensor.shape)}, expected "
                           f"{list(current.shape)}", path, "the file is damaged or not a standard checkpoint")
    if current.is_floating_point() != tensor.is_floating_point():
        raise AlchemyError(f"wrong dtype for {source_key}: {tensor.dtype}", path,
                           "the file is damaged or not a standard checkpoint")
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor


def _materialize_buffers(parts: dict[str, torch.nn.Module], device: torch.device) -> None:
    """Buffers the model computes itself (CLIP position ids) rather than reading from the file."""
    embeddings = parts["text_encoder"].text_model.embeddings
    if getattr(embeddings, "position_ids", None) is not None and embeddings.position_ids.is_meta:
        count = embeddings.position_embedding.num_embeddings
        embeddings.position_ids = torch.arange(count, device=device).unsqueeze(0)


def _check_complete(parts: dict[str, torch.nn.Module], path: Path, layout: keymap.Layout) -> None:
    missing = [keymap.diffusers_to_ldm(name, key, layout).key for name, module in parts.items()
               for key, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    missing = list(dict.fromkeys(missing))     # q/k/v of one OpenCLIP in_proj name the same key
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AlchemyError(f"incomplete checkpoint: {len(missing)} tensors missing ({shown})", path,
                           "the file is damaged or cut short; " + "download or copy it again")


def _is_layer_weight(root: torch.nn.Module, key: str) -> bool:
    module_name, _, name = key.rpartition(".")
    try:
        return name == "weight" and type(root.get_submodule(module_name)) in (torch.nn.Linear, torch.nn.Conv2d)
    except AttributeError:
        return False        # not in the model: _assign says so


def _stream_weights(reader, parts: dict[str, torch.nn.Module], layout: keymap.Layout, home: torch.device,
                    dtype: torch.dtype, half_unet_layers: bool = False) -> dict[str, torch.Tensor]:
    """Convert and assign the file's tensors one at a time; returns the extras (EMA weights dropped).
    With `half_unet_layers`, the UNet's Linear/Conv2d weights that the file holds in float16 stay float16.

    Tensors that are copied anyway (another dtype or device) are read into one scratch buffer reused for
    all of them (see :class:`~.checkpoint.CheckpointReader`); the others are read into memory of their own.
    """
    extras = {}
    # diffusers takes a model's dtype from its first parameter and casts inputs to it: that one stays float32
    first = next(iter(parts["unet"].named_parameters()))[0] if half_unet_layers else None

    kept_half = {key for key in reader.keys() if half_unet_layers and reader.dtype(key) == torch.float16 and all(
        piece.component == "unet" and piece.key != first and _is_layer_weight(parts["unet"], piece.key)
        for piece in keymap.ldm_to_diffusers(key, layout))}

    def copied(key: str) -> bool:
        stored = reader.dtype(key)
        return stored.is_floating_point and (stored != dtype or home.type != "cpu") and key not in kept_half

    sizes = [reader.nbytes(key) for key in reader.keys() if copied(key)]
    scratch = torch.empty(max(sizes), dtype=torch.uint8) if sizes else None
    for key in reader.keys():
        pieces = keymap.ldm_to_diffusers(key, layout)
        if pieces[0].component == keymap.EXTRA:
            if key.startswith(keymap.UNET_PREFIX):
                raise AlchemyError(f"unexpected tensor {key}: this UNet has parts SD1/SD2 do not have", reader.path,
                                   "the standalone backend loads standard SD1.x/SD2.x checkpoints only")
            if not key.startswith("model_ema."):      # an EMA copy would double the memory
                extras[key] = reader.take(key)
            continue
        if pieces[0].component not in parts:
            continue
        tensor = reader.take(key, scratch if copied(key) else None)
        target = torch.float16 if key in kept_half else dtype
        for piece in pieces:
            value = keymap.to_diffusers_tensor(tensor, piece)
            value = value.to(home, target) if value.is_floating_point() else value.to(home)
            _assign(parts[piece.component], piece.key, value.contiguous(), reader.path, key)
        del tensor
    return extras


@dataclasses.dataclass
class LoadedParts:
    config: ModelConfig
    detected: Detected
    parts: dict[str, torch.nn.Module]
    alphas_cumprod: torch.Tensor
    extras: dict[str, torch.Tensor]


def load_parts(path: str | os.PathLike, names: tuple[str, ...] = PARTS, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, config_override: ModelConfig | None = None,
               offload: bool = False, half_unet_layers: bool = False) -> LoadedParts:
    """Detect the model in `path` and load the `names` parts of it (all by default) for `device`.

    `half_unet_layers` (CPU float32 only): the UNet's Linear/Conv2d weights that the file holds in float16
    stay float16, each layer computing in float32 from them (:func:`~..train.low_memory.install_upcast`), for a
    caller that places them itself (:func:`~..train.low_res_layers.load_for_training`).

    The parts are placed on `device` ("auto": cuda when there is one), or kept on the CPU with `offload`.
    With "unet" among them, an SD2 file's prediction type is settled by the WebUI's probe (unless a yaml or
    `config_override` says).
    """
    path = Path(path)
    device = resolve_device(device)
    home = torch.device("cpu") if offload else device
    with open_checkpoint(path) as reader:
        detected = detect(reader)
        config = config_override or choose_config(detected, path)
        dtype = _compute_dtype(dtype, device, reader.dtype(keymap.UNET_PREFIX + "input_blocks.0.0.weight"))
        parts = {name: module for name, module in _build_on_meta(config).items() if name in names}
        layout = keymap.Layout.from_config(config)
        half_unet_layers = half_unet_layers and "unet" in parts and home.type == "cpu" and dtype == torch.float32
        extras = _stream_weights(reader, parts, layout, home, dtype, half_unet_layers)
    if half_unet_layers:
        from ..train.low_memory import install_upcast

        for module in parts["unet"].modules():
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and module.weight.dtype == torch.float16:
                install_upcast(module)
    if "text_encoder" in parts:
        _materialize_buffers(parts, home)
    _check_complete(parts, path, layout)
    for module in parts.values():
        module.eval()
    alphas_cumprod = extras.get("alphas_cumprod")
    if alphas_cumprod is None or alphas_cumprod.shape != (int(config.scheduler["num_train_timesteps"]),):
        alphas_cumprod = alphas_cumprod_from_schedule(config.scheduler).to(torch.float32)
    if config_override is None and detected.prediction_type is None and "unet" in parts:
        is_v = probe_is_v(parts["unet"].to(device), config.unet["cross_attention_dim"])
        parts["unet"].to(home)
        # sd2 and sd2-v share the module structure, so only the facts change.
        detected = dataclasses.replace(detected, prediction_type="v" if is_v else "eps")
        config = choose_config(detected, path)
    # Converted tensors' sources were freed one by one; glibc keeps such holes in its heaps unless asked
    # (measured: about 5% of the weights after an fp16 -> fp32 load of SD1).
    from ..train.cpu_memory import release_free_memory

    release_free_memory()
    return LoadedParts(config, detected, parts, alphas_cumprod.to("cpu", torch.float32), extras)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config_override: ModelConfig | None = None, offload: bool = False,
               half_unet_layers: bool = False) -> StandaloneModel:
    """Load an SD1/SD2 single-file checkpoint (``.safetensors``, ``.ckpt``, ``.pt``) as a StandaloneModel.

    dtype: compute dtype; by default float32 on CPU, the file's half precision elsewhere.
    config_override: use this config instead of detecting one (its prediction type is final).
    offload: keep parts on the CPU until :meth:`StandaloneModel.use` needs them on `device`.
    device: where it runs; "auto" is cuda when there is one.
    half_unet_layers: see :func:`load_parts`.
    """
    device = resolve_device(device)
    loaded = load_parts(path, PARTS, device, dtype, config_override, offload, half_unet_layers)
    return StandaloneModel(path=Path(path), config=loaded.config, parts=loaded.parts,
                           alphas_cumprod=loaded.alphas_cumprod, device=device, offload=offload,
                           extras=loaded.extras)
