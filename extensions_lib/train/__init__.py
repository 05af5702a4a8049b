"""The trainer core every training method plugs into.

- ``options``: the shared training options (methods extend the dataclass).
- ``dataset``: images, captions, templates and prompts from a folder, by the WebUI's rules.
- ``latent_cache``: VAE latents encoded once per image ("once" / "deterministic" / "random").
- ``batches``: which images each optimizer step sees (:class:`~extensions_lib.train.batches.Batch`,
  ``build_training_data``).
- ``diffusion_loss``: pure helpers for the denoising objective (noise, eps/v targets, min-SNR, x0).
- ``plan``: a run's options checked once (:class:`~extensions_lib.train.plan.RunPlan`: seed resolved,
  schedules parsed).
- ``setup``: the model set up for a run and undone (:class:`~extensions_lib.train.setup.RunSetup`: every
  model weight frozen, patches, parts moved out of memory (``offload``), the lean backward
  (``lean_backward``, ``cpu_memory``), the low-resolution layers in float16 computed from row chunks
  (``low_res_layers``), ``low_memory``).
- ``loop``: the :class:`~extensions_lib.train.loop.TrainingMethod` protocol and
  :func:`~extensions_lib.train.loop.train`; its parts: ``lr_schedule``, ``optimizers``, ``resume``,
  ``rng``, ``run_log``, ``provenance``.

A method in brief (textual inversion, say)::

    plan = plan_run(options)                             # or plan_run(resume_options(folder, MyOptions))
    with RunSetup(adapter) as setup:                     # model frozen; undone on exit
        data = build_training_data(adapter, plan.options, name=token, require_name=True)
        setup.undo_with(my_patch(adapter).unpatch)
        method = MyMethod(adapter, data, provenance=collect(adapter, data.dataset, source_note=...))
        result = train(method, plan, callbacks=show_progress, cancel=stop_event)

Shipped prompt templates live in ``templates/``: the WebUI's own set (subject, subject_filewords, style,
style_filewords, hypernetwork, none) and filewords.
"""
