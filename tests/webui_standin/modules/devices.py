"""Stand-in for ``modules/devices.py``: everything runs on the CPU in float32."""
from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False


def cond_cast_unet(input):
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


def torch_gc():
    pass


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()
