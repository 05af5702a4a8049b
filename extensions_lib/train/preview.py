"""What a training preview renders, by the WebUI's rules: one function every training method calls."""
from __future__ import annotations

from ..sampling.txt2img import GenerationOptions

PREVIEW_STEPS = 20
"""Sampling steps of a preview unless the txt2img preview settings are used (the WebUI's fixed 20)."""


def preview_generation(options, last_prompt: str) -> GenerationOptions:
    """The WebUI's preview: `last_prompt` (the last training prompt), 20 steps, the training size (here with
    the run's seed, so previews compare); or the preview settings when "read parameters from txt2img" is on.

    options: a method's training options: :class:`~.options.TrainingOptions`,
    :class:`~.options.PreviewOptions` and ``clip_skip``.
    """
    o = options
    if o.preview_from_txt2img:
        return GenerationOptions(prompt=o.preview_prompt, negative=o.preview_negative_prompt, steps=o.preview_steps,
                                 sampler=o.preview_sampler, cfg_scale=o.preview_cfg_scale,
                                 seed=o.preview_seed if o.preview_seed >= 0 else o.seed,
                                 width=o.preview_width, height=o.preview_height, clip_skip=o.clip_skip)
    return GenerationOptions(prompt=last_prompt, steps=PREVIEW_STEPS, seed=o.seed, width=o.training_width,
                             height=o.training_height, clip_skip=o.clip_skip)
