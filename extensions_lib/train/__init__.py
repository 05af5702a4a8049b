"""The trainer core every training method plugs into.

- ``options``: the shared training options (methods extend the dataclass).
- ``dataset``: images, captions, templates and prompts from a folder, by the WebUI's rules.
- ``latent_cache``: VAE latents encoded once per image ("once" / "deterministic" / "random").
- ``batches``: which images each optimizer step sees (:class:`~extensions_lib.train.batches.Batch`,
  ``build_training_data``).
- ``diffusion_loss``: pure helpers for the denoising objective (noise, eps/v targets, min-SNR, x0).
- ``loop``: the :class:`~extensions_lib.train.loop.TrainingMethod` protocol and
  :func:`~extensions_lib.train.loop.train`; its parts: ``lr_schedule``, ``optimizers``, ``resume``,
  ``rng``, ``run_log``, ``provenance``.

A method in brief (textual inversion, say)::

    options = resolve_seed(options)                      # or resume_options(folder, MyOptions)
    data = build_training_data(adapter, options, name=token, require_name=True)
    method = MyMethod(adapter, data, provenance=collect(adapter, data.dataset, source_note=...))
    result = train(method, options, callbacks=show_progress, cancel=stop_event)

Shipped prompt templates live in ``templates/``: the WebUI's own set (subject, subject_filewords, style,
style_filewords, hypernetwork, none) and filewords.
"""
