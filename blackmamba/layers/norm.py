"""RMSNorm, the per-block pre-norm (weight only, no mean subtraction; spec section 1.2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
