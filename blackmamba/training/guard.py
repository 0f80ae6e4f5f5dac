"""The trainer's non-finite guard, without a host sync per step.

A training step ends with a few device scalars the host wants: the loss, the router loss, the objective
and the gradient norm. Reading them right after the step (``.item()``, ``.tolist()``) waits for the GPU to
finish the step, and the GPU then idles while the host issues the next one. :class:`FiniteGuard` reads them
one step late instead, so the host stays a step ahead:

* with an optimizer that takes a device-side ``found_inf`` (PyTorch's fused AdamW, on GPU and CPU), the
  optimizer itself skips a non-finite step's update on the device, and the values are copied to pinned host
  memory behind the step; the host waits for that copy (an event, not the whole stream) after issuing the
  next step, and raises there;
* with any other optimizer the values are read before the update, as before (on a CPU that costs nothing:
  its work is done when the host gets there).

Either way a run stops at its first non-finite loss or gradient norm and no bad update reaches a saved
checkpoint: :meth:`FiniteGuard.flush` reads everything pending, and the trainer calls it before every log
row, evaluation, checkpoint and the end of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..devices import HostCopy


class StepValues(NamedTuple):
    """What the host reads of one optimizer step (losses are means over its micro-batches and ranks)."""

    step: int
    loss: float
    aux_loss: float
    objective: float
    grad_norm: float


class _Pending(NamedTuple):
    step: int
    values: HostCopy


class FiniteGuard:
    """Stops training at the first step with a non-finite objective or gradient norm.

    ``diverged(what, values)`` builds the exception to raise for the step read as ``values``, where
    ``what`` is ``"loss"`` or ``"norm"``. Call :meth:`check` after the gradients are final and before
    ``optimizer.step()``; then :meth:`settle` (reads all but the newest step) or :meth:`flush` (reads all).
    Both return the steps they read, in order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, diverged: Callable[[str, StepValues], Exception]) -> None:
        self.optimizer = optimizer
        self.diverged = diverged
        # PyTorch's fused Adam/AdamW skip a step on the device when ``optimizer.found_inf`` is 1.
        self.deferred = bool(optimizer.defaults.get("fused"))
        self.pending: list[_Pending] = []

    def check(self, step: int, values: Tensor) -> list[StepValues]:
        """``values`` = (loss, aux loss, objective, gradient norm) of optimizer step ``step``, on the device.

        Deferred: arms the optimizer's skip, starts the copy to the host and returns nothing. Otherwise:
        reads the values now, raises if they are not finite, and returns them."""
        if values.shape != (4,):
            raise ValueError(
                f"expected the 4 values (loss, aux loss, objective, norm), got shape {tuple(values.shape)}"
            )
        values = values.detach()
        if not self.deferred:
            return [self._verified(step, values.tolist())]
        bad = ~torch.isfinite(values[2:]).all()
        self.optimizer.found_inf = bad.to(torch.float32)  # 0-d: DTensor parameters take it as replicated
        self.pending.append(_Pending(step, HostCopy(values)))
        return []

    def settle(self) -> list[StepValues]:
        """Reads every pending step but the newest (waiting only for those steps' kernels)."""
        return self._read(len(self.pending) - 1)

    def flush(self) -> list[StepValues]:
        """Reads every pending step (waits for the newest one's kernels)."""
        return self._read(len(self.pending))

    def _read(self, count: int) -> list[StepValues]:
        done = []
        while count > 0 and self.pending:
            step, values = self.pending.pop(0)
            count -= 1
            done.append(self._verified(step, values.tolist()))
        return done

    def _verified(self, step: int, values: list[float]) -> StepValues:
        read = StepValues(step, *values)
        if not math.isfinite(read.objective):
            self.pending.clear()
            raise self.diverged("loss", read)
        if not math.isfinite(read.grad_norm):
            self.pending.clear()
            raise self.diverged("norm", read)
        return read
