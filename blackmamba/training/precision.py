"""The bf16 copies of the matmul weights made once per optimizer step, not once per micro-batch.

Under bf16 autocast every forward casts each fp32 master weight it multiplies to bf16 (autocast's cast cache
lasts one ``with torch.autocast`` block; the experts cast theirs explicitly). With gradient accumulation the
weights do not change between the micro-batches of a step, so the casts of the second and later micro-batches
remake the same bf16 tensors: at the 2.8B shape about 2.7B weights, 16 GB of memory traffic each time.

:class:`CastOnce` makes those casts at the first forward of a step and runs every forward of the step with
them in place of the parameters (``torch.func.functional_call``). The casts stay differentiable, so each
micro-batch's backward sends its bf16 weight gradient through the same cast into the fp32 parameter's
``.grad``, summed in fp32 as before. The fp32 master weights, the optimizer and every op's arithmetic are
unchanged: the forward sees the bf16 values autocast would have made, the backward the same casts (a
bit-for-bit test is in tests/training/test_precision.py). A hook on the optimizer drops the copies after
each step (the fused AdamW updates in place without moving the parameters' version counters, so staleness
cannot be read off the weights).

Only weights that every consumer multiplies in the autocast dtype are cast: the Mamba projections
(``F.linear``) and the expert weights. Norm weights, the conv, the router (fp32 by design), A_log, D, the dt
bias and the tied embedding (its lookup reads fp32) are left to the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

# Parameter name suffixes of the weights cast once per step.
CAST_SUFFIXES = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "mixer.w1", "mixer.w2")


class CastOnce:
    """Calls ``model`` with its matmul weights cast to ``dtype`` once per step of ``optimizer``.

    The casts are used only in forwards under autocast to ``dtype`` with gradients on; any other call runs
    the model as it is. Use it for the training forwards of a single-process model (not a compiled or
    sharded one, whose parameters are not the module's own).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16):
        self.model, self.dtype = model, dtype
        self.names = [n for n, p in model.named_parameters() if n.endswith(CAST_SUFFIXES) and p.is_floating_point()]
        self._casts: dict[str, Tensor] | None = None
        self._hook = optimizer.register_step_post_hook(lambda *_: self.release())

    def release(self) -> None:
        """Drop the casts (the next forward makes new ones); the optimizer's step calls this."""
        self._casts = None

    def remove(self) -> None:
        """Detach from the optimizer and drop the casts."""
        self._hook.remove()
        self.release()

    def _applies(self) -> bool:
        device = next(self.model.parameters()).device.type
        return (
            torch.is_grad_enabled()
            and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == self.dtype
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._applies():
            return self.model(*args, **kwargs)
        if self._casts is None:
            params = dict(self.model.named_parameters())
            self._casts = {n: params[n].to(self.dtype) for n in self.names}
        return functional_call(self.model, self._casts, args, kwargs, strict=False)
