"""Alchemy inside the AUTOMATIC1111 WebUI: code that *receives* host objects and never imports ``modules.*``.

The thin glue in ``scripts/alchemy.py`` imports the host modules it can find and hands them over as a
:class:`~extensions_lib.host.handles.HostHandles`; everything here works from that, so it can be tested
against a stand-in host and keeps working (with a clear "unsupported" message) when a host lacks a part.

- ``handles``: the host modules we use, and what the host supports (fail-soft messages).
- ``webui_adapter`` / ``ldm_text``: the :class:`~extensions_lib.adapter.ModelAdapter` over ``shared.sd_model``
  (SD1/SD2; SDXL for loading embeddings), aware of ``--medvram``/``--lowvram``; ``ModelWatch`` notices model
  switches that fire no callback.
- ``settings``: our settings section (hypernetwork toggle, folders, tagger and training defaults), rendered
  from the option dataclasses.
- ``wiring``: embeddings through the host's embedding database, the hypernetwork toggle through the host's
  ``loaded_hypernetworks`` (or our own patch where the host has none), infotext; both set aside while a
  training job uses the model.
- ``jobs``: one long job at a time through the host's GPU queue and ``shared.state``.
- ``api``: the FastAPI routes, running the same job functions as the tabs (``extensions_lib.jobs.dataset``,
  ``extensions_lib.jobs.training``).
"""
