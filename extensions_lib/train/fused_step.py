"""Fused backward and optimizer step: no buffer of every gradient at once.

A plain step keeps one gradient per trained weight until ``optimizer.step()``, as much memory again as
the weights (3.4 GB for SD1's UNet in float32). :class:`FusedStep` updates each parameter from inside the
backward pass, as soon as its gradient is complete (``Tensor.register_post_accumulate_grad_hook``,
torch ≥ 2.1), with an optimizer of its own over that one parameter, and frees the gradient right away,
so at most the gradients autograd is still producing are alive. Element-wise optimizers (AdamW, also
8-bit) compute exactly what they compute over all parameters together.

What needs every gradient before any update cannot be fused, and :func:`refusal` says so:
clipping by norm (the norm is over all gradients; clipping by value is refused too, to keep one rule),
gradient accumulation over several micro-batches (each backward pass would step), fp16 loss scaling (its
inf check must see every gradient before it steps). Data-parallel averaging works unchanged: the
averaging hooks run on each gradient before it is accumulated, so the update sees the averaged one.
A gradient that is not finite is not applied (that parameter keeps its value and optimizer state in that
step; :attr:`FusedStep.skipped` counts them), where the plain loop would skip the whole step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import AlchemyError

FIX = "turn off the fused backward+step option"


def supported() -> bool:
    return hasattr(torch.Tensor, "register_post_accumulate_grad_hook")


def refusal(*, gradient_step: int, clip_grad_mode: str, fp16_scaling: bool) -> AlchemyError | None:
    """Why a run with these options cannot fuse backward and step (None: it can)."""
    if not supported():
        return AlchemyError(f"fused backward+step needs torch 2.1 or newer (this is {torch.__version__})",
                            fix=FIX + " or update torch")
    if gradient_step > 1:
        return AlchemyError("fused backward+step updates in every backward pass, so it cannot accumulate "
                            f"gradients over {gradient_step} micro-batches",
                            fix="set gradient accumulation steps to 1 (raise the batch size instead) or " + FIX)
    if clip_grad_mode != "disabled":
        return AlchemyError("fused backward+step cannot clip gradients: it applies each one before the others "
                            "exist", fix="disable gradient clipping or " + FIX)
    if fp16_scaling:
        return AlchemyError("fused backward+step cannot use fp16 loss scaling, which must see every gradient "
                            "before it steps", fix="use bf16 or no mixed precision, or " + FIX)
    return None


class FusedStep:
    """Stands in for the optimizer of a training loop (``param_groups``, ``step``, ``zero_grad``,
    ``state_dict``): the updates happen in backward hooks, so ``step`` and ``zero_grad`` do nothing.
    The loop writes each step's learning rate into :attr:`param_groups` before the backward pass; each
    parameter's optimizer reads it from there. Call :meth:`remove` when training ends."""

    def __init__(self, groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]):
        if not supported():
            raise AlchemyError(f"fused backward+step needs torch 2.1 or newer (this is {torch.__version__})",
                               fix=FIX)
        self.param_groups = groups
        self.skipped = 0
        """Gradients not applied because they were not finite."""
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles = []
        for group in groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                optimizer = make_optimizer([{**group, "params": [p]}])
                self._optimizers.append(optimizer)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(optimizer, group)))

    def _hook(self, optimizer: torch.optim.Optimizer, group: dict) -> Callable[[torch.Tensor], None]:
        def step_now(p: torch.Tensor) -> None:
            if bool(torch.isfinite(p.grad).all()):
                optimizer.param_groups[0]["lr"] = group["lr"]
                optimizer.step()
            else:
                self.skipped += 1
            p.grad = None
        return step_now

    def step(self, closure=None) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"fused": [o.state_dict() for o in self._optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "fused" not in state:
            raise ValueError("the saved optimizer state is not a fused backward+step one")
        if len(state["fused"]) != len(self._optimizers):
            raise ValueError(f"{len(state['fused'])} saved parameter optimizers for {len(self._optimizers)} "
                             "parameters")
        for optimizer, saved in zip(self._optimizers, state["fused"]):
            optimizer.load_state_dict(saved)

    def remove(self) -> None:
        """Take the hooks off the parameters (they would keep updating them in later backward passes)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
