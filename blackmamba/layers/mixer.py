"""The interface of a block's sublayer (the Mamba mixer or the MoE), so that the block only delegates.

Every mixer runs a whole sequence, ``forward(x, cache=None, mask=None) -> (y, stats)``, or one token per
row from its decode state, ``step(x_t, cache, slots=None) -> y_t``, and allocates that state,
``allocate_cache(n_slots, ...)``. The state of ``n_slots`` sequences has the slot as the first dim of every
tensor; ``slots`` (B,) says which slot each row of a step reads and advances (rows 0..B-1 without it), so
a step can run over any set of the sequences in a pool. A stateless mixer (the MoE) has no state: None.

``norm_step`` is the block's decode step from the residual stream: the pre-norm (with the residual add)
and then ``step``. A mixer may fuse the start of its step into the norm's kernel (the MoE routes there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..kernels import add_rms_norm

if TYPE_CHECKING:
    from .moe import RouterStats
    from .norm import RMSNorm


class Mixer(nn.Module):
    def allocate_cache(
        self, n_slots: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Any | None:
        """The decode state of ``n_slots`` sequences, zeroed (None: the mixer has no state)."""
        return None

    def forward(
        self, x: Tensor, cache: Any | None = None, mask: Tensor | None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, RouterStats | None]:
        """x (B, L, D) -> (y (B, L, D), routing statistics or None). With a ``cache`` the sequences continue
        from their state (slots ``slots``, else rows 0..B-1) and leave their final state there."""
        raise NotImplementedError

    def step(self, x_t: Tensor, cache: Any | None, slots: Tensor | None = None) -> Tensor:
        """One token per row: x_t (B, D) -> (B, D), advancing the state of ``slots`` in ``cache``."""
        raise NotImplementedError

    def norm_step(
        self, norm: RMSNorm, residual: Tensor, delta: Tensor | None, cache: Any | None, slots: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(residual + delta, step(RMSNorm(residual + delta))): the block's decode step."""
        h, residual = add_rms_norm(residual, delta, norm.weight, norm.eps)
        return residual, self.step(h, cache, slots)
