"""RMSNorm (the per-block norm of BlackMamba): y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x: (..., D); weight: (D,). fp32 math, output in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm on the selected backend (the PyTorch path is the reference itself until a fused kernel lands)."""
    return rms_norm_ref(x, weight, eps)
