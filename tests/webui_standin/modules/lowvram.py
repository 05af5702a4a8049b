"""Stand-in for ``modules/lowvram.py`` (v1.10.1 ``--medvram``), with CPU standing in for the GPU.

The host keeps the big parts of the model in CPU memory and moves one at a time to the GPU from a
``forward_pre_hook`` named ``send_me_to_gpu`` (the text encoder's hook is on ``.transformer`` for SD1 and on
``.model`` and ``.model.token_embedding`` for SD2, with the whole ``cond_stage_model`` as the part moved; the
VAE's ``encode``/``decode`` are wrapped instead). Code that reads a weight or calls a submodule without
going through those hooks sees CPU tensors beside GPU inputs and fails (WebUI issue #2399).

Here "in CPU memory" is simulated by the ``meta`` device: an offloaded part's parameters and buffers are
swapped for meta tensors (the real ones are kept aside and put back when the hook fires), so any code
that touches an offloaded part without triggering its hook fails loudly, as on a real GPU host.
"""
from __future__ import annotations

import torch

from modules import shared

module_in_gpu = None
cpu = torch.device("cpu")
_stash: dict[int, tuple[dict, dict]] = {}
moves: list[str] = []
"""Class names of the parts brought in, in order (for tests)."""


def _offload(module):
    if id(module) in _stash:
        return
    params, buffers = {}, {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                params[(id(sub), name)] = (sub, p)
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                buffers[(id(sub), name)] = (sub, b)
                sub._buffers[name] = torch.empty_like(b, device="meta")
    _stash[id(module)] = (params, buffers)


def _bring(module):
    params, buffers = _stash.pop(id(module), ({}, {}))
    for (_, name), (sub, p) in params.items():
        # The host moves parts with .to(), which keeps each parameter object and its requires_grad: a flag
        # set while the part was away (on the stand-in's placeholder) must come back with it.
        parked = sub._parameters.get(name)
        if parked is not None:
            p.requires_grad_(parked.requires_grad)
        sub._parameters[name] = p
    for (_, name), (sub, b) in buffers.items():
        sub._buffers[name] = b
    moves.append(type(module).__name__)


def is_offloaded(module) -> bool:
    return id(module) in _stash


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        _offload(module_in_gpu)
    module_in_gpu = None


def is_needed(sd_model):
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram


def apply(sd_model):
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def setup_for_low_vram(sd_model, use_medvram):
    if getattr(sd_model, 'lowvram', False):
        return
    if not use_medvram:
        raise NotImplementedError("the stand-in simulates --medvram only")
    sd_model.lowvram = True
    parents = {}

    def send_me_to_gpu(module, _):
        global module_in_gpu
        module = parents.get(module, module)
        if module_in_gpu == module:
            return
        if module_in_gpu is not None:
            _offload(module_in_gpu)
        _bring(module)
        module_in_gpu = module

    first_stage_model = sd_model.first_stage_model
    first_stage_model_encode = sd_model.first_stage_model.encode
    first_stage_model_decode = sd_model.first_stage_model.decode

    def first_stage_model_encode_wrap(x):
        send_me_to_gpu(first_stage_model, None)
        return first_stage_model_encode(x)

    def first_stage_model_decode_wrap(z):
        send_me_to_gpu(first_stage_model, None)
        return first_stage_model_decode(z)

    is_sd2 = hasattr(sd_model.cond_stage_model, 'model')
    for part in (sd_model.first_stage_model, sd_model.model, sd_model.cond_stage_model):
        _offload(part)

    if is_sd2:
        sd_model.cond_stage_model.model.register_forward_pre_hook(send_me_to_gpu)
        sd_model.cond_stage_model.model.token_embedding.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.model] = sd_model.cond_stage_model
        parents[sd_model.cond_stage_model.model.token_embedding] = sd_model.cond_stage_model
    else:
        sd_model.cond_stage_model.transformer.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.transformer] = sd_model.cond_stage_model

    sd_model.first_stage_model.register_forward_pre_hook(send_me_to_gpu)
    sd_model.first_stage_model.encode = first_stage_model_encode_wrap
    sd_model.first_stage_model.decode = first_stage_model_decode_wrap
    sd_model.model.register_forward_pre_hook(send_me_to_gpu)


def is_enabled(sd_model):
    return sd_model.lowvram
