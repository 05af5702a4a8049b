"""APT (DreamArtist-style contrastive prompt tuning): a positive embedding ``{name}`` and a negative one
``{name}-neg`` trained together, with classifier-free guidance inside the loss.

Per step one text-encoder call encodes ``[negative prompts, positive prompts]`` and one UNet call
predicts for the doubled batch; the loss compares the guided prediction ``e_neg + s·(e_pos − e_neg)``
with the target (noise, or velocity for v-prediction models). Since ``d/de_neg = 1 − s``, for s > 1 the
negative learns what to steer away from while the positive absorbs the concept.

- ``options``: the Create and Train options, declared once.
- ``cfg_scale``: the CFG-scale field (a constant or a ``lo-hi[:kind]`` schedule over timesteps).
- ``att_mask``: per-pixel loss weights from ``<stem>_att`` masks.
- ``create``: writes the pair.
- ``guided``: the guided loss (and the naive two-call form the bench compares against).
- ``data``: the dataset with negative prompts, mask weights and (for reconstruction) pixels.
- ``decoder_checkpoint``: the VAE decoder checkpointed for the reconstruction loss's backward, undone after.
- ``method``: the :class:`~extensions_lib.train.loop.TrainingMethod`; ``session``: the entry point.
"""
