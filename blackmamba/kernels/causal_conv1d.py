"""Causal depthwise conv1d (width K) with optional SiLU, in (B, L, D) layout.

    y_t[c] = act( bias[c] + sum_{k<K} weight[c, k] * x_{t-K+1+k}[c] ),   x_{<0} = initial_state or 0

``initial_state`` (B, K-1, D) holds the K-1 inputs that precede the sequence (the decode cache), so a
long input can be processed in pieces. The final state is the last K-1 inputs of the padded sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend


def _left_context(x: Tensor, weight: Tensor, initial_state: Tensor | None) -> Tensor:
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"causal_conv1d: x must be (B, L, D) and weight (D, K); got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    batch, _, dim = x.shape
    width = weight.shape[1]
    if initial_state is None:
        return x.new_zeros(batch, width - 1, dim)
    if initial_state.shape != (batch, width - 1, dim):
        raise ValueError(
            f"causal_conv1d: initial_state must be {(batch, width - 1, dim)}, got {tuple(initial_state.shape)}"
        )
    return initial_state.to(x.dtype)


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference through ``F.conv1d`` (as the released code's fallback). x: (B, L, D); weight: (D, K)."""
    width = weight.shape[1]
    xp = torch.cat([_left_context(x, weight, initial_state), x], dim=1)
    y = F.conv1d(
        xp.transpose(1, 2).float(),
        weight.float()[:, None, :],
        None if bias is None else bias.float(),
        groups=x.shape[2],
    ).transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}")
    y = y.to(x.dtype)
    return (y, xp[:, xp.shape[1] - (width - 1) :]) if return_final_state else y


def causal_conv1d_shifted(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fast path: K shifted multiply-adds over the (B, L, D) layout, no transposes; fp32 accumulation."""
    width = weight.shape[1]
    length = x.shape[1]
    xp = torch.cat([_left_context(x, weight, initial_state), x], dim=1)
    xf, w = xp.float(), weight.float()
    y = xf[:, 0:length] * w[:, 0]
    for k in range(1, width):
        y = torch.addcmul(y, xf[:, k : k + length], w[:, k])
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}")
    y = y.to(x.dtype)
    return (y, xp[:, xp.shape[1] - (width - 1) :]) if return_final_state else y


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv on the selected backend; see :func:`causal_conv1d_ref`."""
    impl = causal_conv1d_ref if resolve_backend(x) == "ref" else causal_conv1d_shifted
    return impl(x, weight, bias, activation, initial_state, return_final_state)


def causal_conv1d_update(
    x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu"
) -> Tensor:
    """One decode step. x: (B, D) the new input; state: (B, K-1, D) the previous inputs, shifted in place."""
    window = torch.cat([state, x[:, None].to(state.dtype)], dim=1)  # (B, K, D)
    y = torch.einsum("bkd,dk->bd", window.float(), weight.float())
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    state.copy_(window[:, 1:])
    return y.to(x.dtype)
