"""The trainer core every training method plugs into.

- ``options``: the shared training options (methods extend the dataclass).
- ``dataset`` / ``latent_cache`` / ``batches``: images, captions and prompts, VAE latents encoded once,
  and the per-step batches.
- ``diffusion_loss``: pure helpers for the denoising objective.
- ``loop``: the :class:`~extensions_lib.train.loop.TrainingMethod` protocol and :func:`~extensions_lib.train.loop.train`.
- ``lr_schedule``, ``provenance``, ``resume``, ``rng``, ``run_log``: the loop's parts.

Shipped prompt templates live in ``templates/`` (subject, subject_filewords, style, style_filewords,
filewords).
"""
