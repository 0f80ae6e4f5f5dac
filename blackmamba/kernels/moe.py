"""The experts of a top-1 MoE layer: permute tokens by expert, gated MLP per expert, un-permute with the gate.

    y_t = gate_t * W2[e_t] ( act(a) * b ),   [a ; b] = W1[e_t] x_t   (a: rows [0, F) of W1, b: rows [F, 2F))

Expert weights are stacked: ``w1_EFD`` is (E, 2F, D) and ``w2_EDF`` is (E, D, F), the layout of the
released ``linear_fc1`` / ``linear_fc2`` weights stacked over experts. Dropless: every token reaches
its expert whatever the load. ``moe_experts_ref`` is the plain loop over experts with boolean masks;
the fast path sorts tokens by expert once and runs one matrix product per expert on a contiguous slice,
reading the per-expert counts from the device once per call (never once per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend


def gated_activation(h: Tensor, activation: str) -> Tensor:
    """act(a) * b for h = [a ; b] split in halves along the last axis."""
    a, b = h.chunk(2, dim=-1)
    if activation == "gelu":
        return F.gelu(a) * b
    if activation == "silu":
        return F.silu(a) * b
    if activation == "gelu_tanh":
        return F.gelu(a, approximate="tanh") * b
    raise ValueError(f"unknown MoE activation {activation!r}")


def _check(x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor) -> None:
    if x_TD.ndim != 2 or expert_T.shape != x_TD.shape[:1] or gate_T.shape != x_TD.shape[:1]:
        raise ValueError(
            f"moe_experts: want x (T, D), expert (T,), gate (T,); got {tuple(x_TD.shape)}, "
            f"{tuple(expert_T.shape)}, {tuple(gate_T.shape)}"
        )
    n_exp, two_f, dim = w1_EFD.shape
    if dim != x_TD.shape[1] or w2_EDF.shape != (n_exp, dim, two_f // 2):
        raise ValueError(
            f"moe_experts: weights (E, 2F, D) and (E, D, F) do not fit x of width {x_TD.shape[1]}: "
            f"{tuple(w1_EFD.shape)}, {tuple(w2_EDF.shape)}"
        )


def moe_experts_ref(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """Loop over experts with masks. x: (T, D); expert: (T,) int; gate: (T,). Returns (T, D) in x's dtype."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    outs = {}
    for e in range(w1_EFD.shape[0]):
        mask = expert_T == e
        h = gated_activation(x_TD[mask] @ w1_EFD[e].t(), activation)
        out = h @ w2_EDF[e].t()
        outs[e] = (mask, out * gate_T[mask, None].to(out.dtype))
    # The experts' dtype (which autocast may lower) sets the output's.
    dtype = next(iter(outs.values()))[1].dtype
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=dtype)
    for mask, out in outs.values():
        y_TD = y_TD.index_put((mask,), out)
    return y_TD


def permute(expert_T: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Token order that groups tokens by expert (stable) and the number of tokens per expert."""
    order_T = torch.argsort(expert_T, stable=True)
    counts_E = torch.bincount(expert_T, minlength=n_experts)
    return order_T, counts_E


def experts_sorted(x_sorted_TD: Tensor, counts_E: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str) -> Tensor:
    """Gated MLPs on tokens already grouped by expert: the seam where a grouped-GEMM kernel plugs in."""
    outs = []
    for e, x_e in enumerate(x_sorted_TD.split(counts_E.tolist())):
        if x_e.shape[0]:
            outs.append(gated_activation(x_e @ w1_EFD[e].t(), activation) @ w2_EDF[e].t())
    return torch.cat(outs) if outs else x_sorted_TD.new_zeros(0, w2_EDF.shape[1])


def moe_experts_sorted(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """Fast path: route -> permute -> experts -> un-permute with the gate."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    order_T, counts_E = permute(expert_T, w1_EFD.shape[0])
    y_sorted = experts_sorted(x_TD[order_T], counts_E, w1_EFD, w2_EDF, activation)
    y_sorted = y_sorted * gate_T[order_T, None].to(y_sorted.dtype)
    return x_TD.new_zeros(x_TD.shape, dtype=y_sorted.dtype).index_copy(0, order_T, y_sorted)


def moe_experts(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """The MoE experts on the selected backend; see :func:`moe_experts_ref`."""
    impl = moe_experts_ref if resolve_backend(x_TD) == "ref" else moe_experts_sorted
    return impl(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
