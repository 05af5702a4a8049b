"""The model set up for one training run, and undone: :class:`RunSetup`.

Every method trains a few tensors of its own (an embedding's vectors, a hypernetwork's layers) through a
model whose weights must stay as they are. The WebUI leaves its UNet parameters ``requires_grad=True``
(the LDM code freezes only the VAE and the text encoder), so without freezing, each backward pass would
compute and keep a gradient for every UNet weight. A run set-up freezes every model weight first, then
applies what the method asks for (patches, parts moved out of memory, the lean backward), and undoes all
of it in reverse order when the block ends: on success, on error and on interrupt alike::

    with RunSetup(adapter) as setup:                 # every model weight frozen, modules in eval mode
        patch = setup.apply(my_patch(adapter))       # a context manager, or setup.undo_with(fn)
        setup.move_away(parts_not_read)              # an Offload / OffloadSet, put back at the end
        setup.low_res_layers(512, 512, 1)            # CPU: low-resolution UNet layers in float16, chunked
        setup.lean_backward()                        # CPU: frozen UNet layers save less for backward
        result = train(method, plan)
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, TypeVar

from torch import nn

from .cpu_memory import keeping_freed_memory, release_free_memory
from .lean_backward import lean_backward
from .low_res_layers import LowResReport, low_res_layers, training_rows, unet_runner

log = logging.getLogger(__name__)

T = TypeVar("T")


def all_real(module: nn.Module) -> bool:
    """No meta tensor in `module` (a host may park parts as meta tensors; those are not ours to move)."""
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


@contextlib.contextmanager
def frozen(parts: list[nn.Module]):
    """Every parameter of `parts` without gradient and every module in eval mode inside the block; the
    previous flags are restored exactly afterwards. Flags are restored by parameter name: a host that
    parks parts (``--medvram`` hooks) may have replaced the parameter objects meanwhile."""
    grads = [(part, {name: p.requires_grad for name, p in part.named_parameters()}) for part in parts]
    modes = [(m, m.training) for part in parts for m in part.modules()]
    for part in parts:
        part.requires_grad_(False)
        part.eval()
    try:
        yield
    finally:
        for part, flags in grads:
            for name, p in part.named_parameters():
                if name in flags:
                    p.requires_grad_(flags[name])
        for m, flag in modes:
            m.training = flag


def frozen_model(adapter):
    """:func:`frozen` over every module of the adapter (``adapter.modules()``)."""
    return frozen(list(adapter.modules().values()))


class RunSetup:
    """See the module docstring. Entering freezes the adapter's modules (``adapter.modules()``); each
    other step registers its undo, and leaving runs the undos newest first."""

    def __init__(self, adapter):
        self.adapter = adapter
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "RunSetup":
        self._stack.__enter__()
        try:
            self.apply(frozen_model(self.adapter))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    @property
    def may_move_parts(self) -> bool:
        """Whether this run may move model parts itself (not when the adapter or its host does:
        :attr:`~extensions_lib.adapter.ModelAdapter.moves_parts`)."""
        return not self.adapter.moves_parts

    def apply(self, context: contextlib.AbstractContextManager[T]) -> T:
        """Enter `context` (a patch, say) now and exit it when the run set-up is undone."""
        return self._stack.enter_context(context)

    def undo_with(self, undo: Callable[[], Any]) -> None:
        """Call `undo` when the run set-up is undone (for changes that are not context managers)."""
        self._stack.callback(undo)

    def move_away(self, parts) -> None:
        """Move `parts` (an :class:`~.offload.Offload` or :class:`~.offload.OffloadSet`) out of memory
        now and back when the run set-up is undone."""
        parts.move_away()
        self._stack.callback(parts.put_back)

    def lean_backward(self) -> int:
        """On the CPU, swap the UNet's frozen layers for ones that save less for backward, with glibc keeping
        freed memory for the next step (:mod:`.lean_backward`, :mod:`.cpu_memory`); how many were swapped.
        Not on CUDA: the lean layers' backward under autocast has not been run on a GPU yet."""
        unet = self.adapter.modules().get("unet")
        if unet is None or self.adapter.device.type != "cpu":
            return 0
        swapped = self.apply(lean_backward(unet))
        self.apply(keeping_freed_memory())
        return swapped

    def low_res_layers(self, width: int, height: int, batch: int) -> LowResReport | None:
        """On the CPU, have the UNet's frozen layers that see few positions at this training size hold their
        weights in float16 where exact and compute from row chunks (:mod:`.low_res_layers`); undone with the
        run. None when not on the CPU, when parts move, or when the UNet could not be probed (logged)."""
        unet = self.adapter.modules().get("unet")
        if unet is None or self.adapter.device.type != "cpu" or not self.may_move_parts or not all_real(unet):
            return None
        try:
            rows = training_rows(unet, unet_runner(self.adapter), (height // 8, width // 8), batch)
        except Exception as error:     # an optimisation only: a UNet we cannot probe trains as it is
            log.warning("low-resolution layers left as they are: probing the UNet failed: %s", error)
            return None
        report = self.apply(low_res_layers(unet, rows))
        release_free_memory()
        return report

    def release_memory(self) -> None:
        """Hand freed memory back to the system now and again when the run set-up is undone."""
        release_free_memory()
        self._stack.callback(release_free_memory)
