"""A stand-in for the AUTOMATIC1111 WebUI (v1.10.1) module API, for testing Alchemy's WebUI glue on CPU.

``modules/`` mirrors the host modules our glue touches, with the documented v1.10.1 signatures (see
``/work/shared/reference/a1111-host.md`` sections 2, 3 and 7): ``script_callbacks``, ``scripts``,
``shared`` (``opts``/``OptionInfo``/``options_section``/``state``/``sd_model``/hypernetworks),
``call_queue``, ``progress``, ``devices``, ``lowvram``, ``sd_hijack`` with its embedding database,
``hypernetworks.hypernetwork``, ``extra_networks``, ``processing`` and ``sd_models``. ``ldm_standin`` builds
an LDM-shaped model (``cond_stage_model`` wrapper, ``apply_model``, ``alphas_cumprod``,
``encode_first_stage``/``get_first_stage_encoding``/``decode_first_stage``) over a tiny checkpoint.

Only :mod:`webui_standin.harness` should be imported by tests; it puts this folder on ``sys.path`` so
that ``import modules.shared`` resolves here, and gives every test a fresh host.
"""
