"""Samplers and preview generation.

``schedule`` (sigmas from the training schedule), one sampler per file (``euler``, ``ddim``), ``denoiser``
(ModelAdapter -> ``model_fn(x, sigma) -> denoised`` with classifier-free guidance), ``samplers`` (the
named choices), ``txt2img`` (:func:`generate`) and ``infotext`` (the WebUI's PNG "parameters").
"""
from .samplers import SAMPLERS, SamplerSpec, find_sampler
from .txt2img import GenerationOptions, generate, generate_from

__all__ = ["SAMPLERS", "SamplerSpec", "find_sampler", "GenerationOptions", "generate", "generate_from"]
