"""An LDM-shaped model over a tiny checkpoint: the object the WebUI holds in ``shared.sd_model`` (SD1/SD2).

The shapes follow ldm (``LatentDiffusion`` with ``model.diffusion_model``, ``first_stage_model``,
``cond_stage_model``) and the WebUI's flags (``is_sd1``/``is_sd2``, ``lowvram``, ``sd_checkpoint_info``...):

- text: SD1 ``FrozenCLIPEmbedder`` (``.tokenizer`` + ``.transformer``, a transformers ``CLIPTextModel``
  loaded from the checkpoint's ``cond_stage_model.transformer.*`` keys as they are); SD2
  ``FrozenOpenCLIPEmbedder`` whose ``.model`` is an OpenCLIP text tower built from open_clip's own
  ``Transformer`` and loaded from ``cond_stage_model.model.*`` (the real ldm code path: token embedding +
  positional, resblocks up to the penultimate, ``ln_final``) — independent of Alchemy's key conversion;
- UNet and VAE: diffusers modules (ldm's are not installed), behind ldm's call signatures
  (``diffusion_model(x, timesteps, context)``, ``first_stage_model.encode -> DiagonalGaussianDistribution``).
  Each attention layer runs the host's attention forward: ``context_k, context_v =
  apply_hypernetworks(shared.loaded_hypernetworks, context, layer)`` before ``to_k``/``to_v``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from extensions_lib.backend import keymap


class DiagonalGaussianDistribution:
    """ldm's ``DiagonalGaussianDistribution`` (moments = concat(mean, logvar) on the channel axis)."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape, device=self.parameters.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """ldm's first stage: ``encode(x) -> DiagonalGaussianDistribution``, ``decode(z) -> image`` (state dict
    in ldm's key names)."""

    def __init__(self, vae, layout=None):
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.quant_conv, self.post_quant_conv = vae.quant_conv, vae.post_quant_conv
        if layout is not None:
            _ldm_state_dict_names(self, "vae", lambda wrapper: wrapper, layout)  # same names as diffusers

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        return self.decode(self.encode(x).sample())


class HostAttnProcessor:
    """The WebUI's attention forward around a diffusers attention layer.

    Without hypernetworks (the common case) the original processor runs unchanged; with them, k and v
    get their own contexts, which the one-context diffusers processor cannot take, so attention is
    computed here the way diffusers' SDPA processor does for these blocks.
    """

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        from modules import shared
        from modules.hypernetworks import hypernetwork

        context = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context, attn)
        if context_k is context and context_v is context:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context_k), attn.to_v(context_v)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _key_pairs(module: nn.Module, diffusers_module: nn.Module) -> dict[str, str]:
    """{key in `module`'s state dict: the same tensor's key in `diffusers_module`'s}, paired by identity (the
    wrapper registers the diffusers modules under other names, or under ldm's layout)."""
    theirs = {id(t): k for k, t in [*diffusers_module.named_parameters(), *diffusers_module.named_buffers()]}
    return {k: theirs[id(t)] for k, t in [*module.named_parameters(), *module.named_buffers()] if id(t) in theirs}


def _ldm_names(component, diffusers_of, layout, module, state_dict, prefix, local_metadata):
    """state_dict hook: every UNet/VAE key named as in a real host's LDM model (via the diffusers key of the
    same tensor and the checkpoint key map), so ``sd_model.state_dict()`` has what the WebUI's loader reads."""
    base = keymap.UNET_PREFIX if component == "unet" else keymap.VAE_PREFIX
    pairs = _key_pairs(module, diffusers_of(module))
    for local, diffusers_key in pairs.items():
        if prefix + local in state_dict:
            piece = keymap.diffusers_to_ldm(component, diffusers_key, layout)
            state_dict[prefix + piece.key[len(base):]] = keymap.to_ldm_tensor(state_dict.pop(prefix + local), piece)


def _from_ldm_names(component, diffusers_of, layout, module, state_dict, prefix, *args):
    """load_state_dict pre-hook, the inverse of :func:`_ldm_names` (the host loads LDM state dicts)."""
    base = keymap.UNET_PREFIX if component == "unet" else keymap.VAE_PREFIX
    local_of = {d: k for k, d in _key_pairs(module, diffusers_of(module)).items()}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        pieces = keymap.ldm_to_diffusers(base + key[len(prefix):], layout)
        if pieces and all(p.key in local_of for p in pieces):
            tensor = state_dict.pop(key)
            for piece in pieces:
                state_dict[prefix + local_of[piece.key]] = keymap.to_diffusers_tensor(tensor, piece)


def _ldm_state_dict_names(module: nn.Module, component: str, diffusers_of, layout) -> None:
    module._register_state_dict_hook(functools.partial(_ldm_names, component, diffusers_of, layout))
    module._register_load_state_dict_pre_hook(
        functools.partial(_from_ldm_names, component, diffusers_of, layout), with_module=True)


def _seq(*modules: nn.Module) -> nn.ModuleList:
    return nn.ModuleList(list(modules))


class UNetModel(nn.Module):
    """ldm's ``UNetModel`` call signature over a diffusers UNet, its modules named as ldm names them.

    The diffusers UNet runs the forward, but is not a registered child: its modules are registered under
    ldm's layout (ldm's ``UNetModel.__init__``: ``input_blocks[0]`` = conv_in; per level ``2`` blocks of
    [resnet, attention] then a downsampler; ``middle_block`` = [resnet, attention, resnet]; per level
    ``3`` output blocks of [resnet, attention?, upsampler?]; ``time_embed`` = [Linear, SiLU, Linear];
    ``out`` = [norm, SiLU, conv]). Attention blocks are the very same objects in both trees and name their
    insides as ldm's ``SpatialTransformer`` does (proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj,
    ...), so ``sd_model.model.named_modules()`` gives the host's paths there (what its Lora extension
    names layers by). Inside resnets and samplers the names stay diffusers' (norm1, conv1, ...).
    """

    def __init__(self, unet, layout=None):
        super().__init__()
        object.__setattr__(self, "_diffusers", unet)  # runs the forward; not in the module tree
        from diffusers.models.attention_processor import Attention

        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(HostAttnProcessor(module.processor))
        self.time_embed = _seq(unet.time_embedding.linear_1, nn.SiLU(), unet.time_embedding.linear_2)
        self.input_blocks = nn.ModuleList([_seq(unet.conv_in)])
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or []
            for j, resnet in enumerate(block.resnets):
                self.input_blocks.append(_seq(resnet, *([attentions[j]] if attentions else [])))
            for sampler in block.downsamplers or []:
                self.input_blocks.append(_seq(sampler))
        mid = unet.mid_block
        self.middle_block = _seq(mid.resnets[0], mid.attentions[0], mid.resnets[1])
        self.output_blocks = nn.ModuleList()
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None) or []
            for j, resnet in enumerate(block.resnets):
                last = j == len(block.resnets) - 1 and block.upsamplers
                self.output_blocks.append(_seq(resnet, *([attentions[j]] if attentions else []),
                                               *(block.upsamplers if last else [])))
        self.out = _seq(unet.conv_norm_out, nn.SiLU(), unet.conv_out)
        mine, theirs = {id(p) for p in self.parameters()}, {id(p) for p in unet.parameters()}
        assert mine == theirs, "the ldm-named tree must hold every UNet parameter exactly once"
        if layout is not None:  # and the state dict has ldm's keys throughout (resnets included)
            _ldm_state_dict_names(self, "unet", lambda wrapper: wrapper._diffusers, layout)

    @property
    def unet(self):
        return self._diffusers

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        return self._diffusers(x, timesteps, encoder_hidden_states=context).sample


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        raise NotImplementedError(self.conditioning_key)


class FrozenCLIPEmbedder(nn.Module):
    """ldm's SD1 text encoder: ``.tokenizer`` (transformers CLIPTokenizer) and ``.transformer``."""

    def __init__(self, tokenizer, transformer):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.max_length = 77
        self.layer = "last"

    def forward(self, text):
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                               return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        tokens = batch["input_ids"].to(self.transformer.device)
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, text):
        return self(text)


class OpenClipTextTower(nn.Module):
    """The parts of an open_clip ``CLIP`` that ldm keeps (``.visual`` is deleted there)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, context_length: int = 77,
                 vocab_size: int = 49408):
        super().__init__()
        from open_clip.transformer import LayerNorm, Transformer

        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, width))
        self.logit_scale = nn.Parameter(torch.ones([]))
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm's SD2 text encoder: ``.model`` (the OpenCLIP text tower), penultimate layer."""

    def __init__(self, model: OpenClipTextTower):
        super().__init__()
        self.model = model
        self.layer = "penultimate"
        self.layer_idx = 1

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        x = x.permute(1, 0, 2)
        return self.model.ln_final(x)

    def text_transformer_forward(self, x, attn_mask=None):
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - self.layer_idx:
                break
            x = r(x, attn_mask=attn_mask)
        return x

    def forward(self, text):
        import open_clip

        return self.encode_with_transformer(open_clip.tokenize(text).to(self.model.positional_embedding.device))

    def encode(self, text):
        return self(text)


class CheckpointInfo:
    """``modules.sd_models.CheckpointInfo`` for a file (hashes computed eagerly: files are tiny)."""

    def __init__(self, filename: str | Path):
        import hashlib

        self.filename = str(filename)
        self.name = Path(filename).name
        self.model_name = Path(filename).stem
        self.sha256 = hashlib.sha256(Path(filename).read_bytes()).hexdigest()
        self.hash = self.sha256[:8]
        self.shorthash = self.sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.model_name} [{self.shorthash}]"


class LatentDiffusion(nn.Module):
    """ldm's ``LatentDiffusion`` as far as the WebUI and its extensions use it."""

    def __init__(self, unet, vae, cond_stage_model, alphas_cumprod, parameterization, scale_factor, layout=None):
        super().__init__()
        self.model = DiffusionWrapper(UNetModel(unet, layout))
        self.first_stage_model = AutoencoderKL(vae, layout)
        self.cond_stage_model = cond_stage_model
        self._register_schedule(alphas_cumprod.double())
        # ldm keeps logvar as a plain tensor (a parameter only with learn_logvar): not in the state dict
        self.logvar = torch.zeros(alphas_cumprod.shape[0])
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.conditioning_key = "crossattn"
        self.num_timesteps = int(alphas_cumprod.shape[0])

    def _register_schedule(self, ac: torch.Tensor) -> None:
        """ldm's ``register_schedule`` buffers (v_posterior 0), derived from ᾱ as the model holds it."""
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1 - ac / prev
        posterior_variance = betas * (1 - prev) / (1 - ac)
        buffers = {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac)}
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            cond = {"c_crossattn": cond}
        return self.model(x_noisy, t, **cond)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    def get_learned_conditioning(self, c):
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            return self.cond_stage_model.encode(c)
        return self.cond_stage_model(c)


def _text_encoder(config, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    if config.text_encoder_kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        from extensions_lib.backend.tokenizer import make_tokenizer

        transformer = CLIPTextModel(CLIPTextConfig(**config.component("text_encoder")))
        weights = {k[len(keymap.CLIP_PREFIX):]: v for k, v in state_dict.items() if k.startswith(keymap.CLIP_PREFIX)}
        transformer.load_state_dict(weights, strict=False)
        return FrozenCLIPEmbedder(make_tokenizer("clip").wrapped, transformer.eval())
    text = config.text_encoder
    tower = OpenClipTextTower(width=text["hidden_size"], layers=text["num_hidden_layers"],
                              heads=text["num_attention_heads"],
                              mlp_ratio=text["intermediate_size"] / text["hidden_size"])
    weights = {k[len(keymap.OPEN_CLIP_PREFIX):]: v for k, v in state_dict.items()
               if k.startswith(keymap.OPEN_CLIP_PREFIX)}
    tower.load_state_dict(weights, strict=True)
    return FrozenOpenCLIPEmbedder(tower.eval())


_BUILT: dict[tuple[str, int], LatentDiffusion] = {}


def build_ldm(checkpoint: str | Path, cached: bool = True) -> LatentDiffusion:
    """The LDM-shaped model of a tiny checkpoint, float32 on the CPU, with the WebUI's flags set.

    Built once per file and then deep-copied, so every host gets its own untouched model quickly."""
    import copy

    if not cached:
        return _build_ldm(checkpoint)
    key = (str(checkpoint), Path(checkpoint).stat().st_mtime_ns)
    if key not in _BUILT:
        _BUILT[key] = _build_ldm(checkpoint)
    return copy.deepcopy(_BUILT[key])


def _build_ldm(checkpoint: str | Path) -> LatentDiffusion:
    from safetensors.torch import load_file

    from extensions_lib.backend.standalone import load_parts

    loaded = load_parts(checkpoint, ("unet", "vae"))
    state_dict = load_file(str(checkpoint))
    cond = _text_encoder(loaded.config, state_dict)
    model = LatentDiffusion(loaded.parts["unet"], loaded.parts["vae"], cond, loaded.alphas_cumprod,
                            loaded.config.prediction_type, float(loaded.config.scale_factor),
                            layout=keymap.Layout.from_config(loaded.config))
    with torch.no_grad():  # the file's schedule buffers replace the derived ones, as the host's strict=False load does
        for name, buffer in model.named_buffers(recurse=False):
            if name in state_dict:
                buffer.copy_(state_dict[name])
    # As ldm: only the first stage (VAE) and the text encoder are frozen (instantiate_first_stage, the
    # embedder's freeze()); the UNet's parameters keep requires_grad=True in the real host (our loader
    # hands them over frozen).
    model.model.requires_grad_(True)
    model.first_stage_model.requires_grad_(False)
    model.cond_stage_model.requires_grad_(False)
    model.eval()
    family = loaded.config.family
    model.is_sd1, model.is_sd2, model.is_sdxl, model.is_ssd, model.is_sd3 = family == "sd1", family == "sd2", False, False, False
    model.model_type = family
    model.latent_channels = 4
    model.lowvram = False
    info = CheckpointInfo(checkpoint)
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    model.sd_model_hash = info.shorthash
    model.alphas_cumprod_original = model.alphas_cumprod
    return model
