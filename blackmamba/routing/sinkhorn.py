"""Sinkhorn routing for training (paper section 3; spec section 5.1).

BlackMamba trains with Sinkhorn routing: the expert of each token is the argmax of a doubly stochastic
rescaling P = diag(d0) C diag(d1) of the costs C = exp(2 * logits), which spreads tokens evenly over the
experts without an auxiliary loss. It runs under no_grad and only chooses the expert; the gate stays
the sigmoid of the chosen expert's logit.

The paper's new initialisation sets the column scaling to d1 = 1 / (E * column sums of C) instead of
the vanilla d1 = 1. We follow the released code's update rule and add an iteration cap, so a
pathological batch can never stall training. Two stopping tests:

* "released": the released code's, mean |change of d1| <= tol. It is absolute, and the new
  initialisation makes d1 about 1 / (E * column mass), so for batches of many tokens the test passes
  after one iteration whether or not the row marginals have converged (benchmarks/sinkhorn.py measures
  this: the fast "convergence" is largely this scale effect).
* "marginals": scale-free, every row sum within ``tol`` (relative) of 1/T; the column sums are exact
  after each column update. This is what convergence of the balanced assignment means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.backend import resolve_backend
from ..kernels.sinkhorn import sinkhorn_experts, sinkhorn_scaling_triton

SINKHORN_INITS = ("zyphra", "ones")
SINKHORN_CRITERIA = ("released", "marginals")
SINKHORN_EPS = 1e-8  # keeps the scalings finite when a row or column of the costs underflows


def _check_args(init: str, criterion: str, max_iters: int) -> None:
    if init not in SINKHORN_INITS:
        raise ValueError(f"unknown Sinkhorn initialisation {init!r}; choose one of {SINKHORN_INITS}")
    if criterion not in SINKHORN_CRITERIA:
        raise ValueError(f"unknown Sinkhorn stopping criterion {criterion!r}; choose one of {SINKHORN_CRITERIA}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")


@torch.no_grad()
def sinkhorn_scaling(
    logits_TE: Tensor,
    tol: float = 1e-4,
    max_iters: int = 50,
    init: str = "zyphra",
    eps: float = SINKHORN_EPS,
    criterion: str = "released",
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The reference iteration: (cost C (T, E), row scaling d0 (T,), column scaling d1 (E,), iterations),
    P = diag(d0) C diag(d1). Each iteration's convergence test is read on the host."""
    _check_args(init, criterion, max_iters)
    cost = torch.exp(2 * logits_TE.float().clamp(max=40.0))
    tokens, experts = cost.shape
    if init == "zyphra":
        d1 = 1.0 / (experts * cost.sum(dim=0))
    else:
        d1 = torch.ones(experts, dtype=cost.dtype, device=cost.device)
    iters, converged = 0, False
    while not converged and iters < max_iters:
        d0 = (1.0 / tokens) / (cost @ d1 + eps)
        d1_new = (1.0 / experts) / (d0 @ cost + eps)
        if criterion == "released":
            converged = bool((d1_new - d1).abs().mean() <= tol)
        else:
            row_mass = d0 * (cost @ d1_new) * tokens
            converged = bool((row_mass - 1).abs().max() <= tol)
        d1 = d1_new
        iters += 1
    return cost, d0, d1, iters


def sinkhorn(
    logits_TE: Tensor,
    tol: float = 1e-4,
    max_iters: int = 50,
    init: str = "zyphra",
    eps: float = SINKHORN_EPS,
    criterion: str = "released",
) -> tuple[Tensor, int]:
    """Balanced assignment probabilities P (T, E) (rows sum to ~1/T, columns to ~1/E) and the number of
    iterations used. Computed in fp32; logits are clamped at 40 so exp(2 * logits) stays finite."""
    cost, d0, d1, iters = sinkhorn_scaling(logits_TE, tol, max_iters, init, eps, criterion)
    return d0[:, None] * cost * d1[None, :], iters


def sinkhorn_top1(
    logits_TE: Tensor, tol: float = 1e-4, max_iters: int = 50, init: str = "zyphra", criterion: str = "released"
) -> tuple[Tensor, Tensor, int | Tensor]:
    """Expert by Sinkhorn (no gradient), gate = sigmoid of the chosen logit (with gradient), and the
    iterations used. With the Triton backend the iteration runs in one kernel that never waits for the host
    (:mod:`blackmamba.kernels.sinkhorn`), and the count is a 0-d int32 tensor on the device (read it when
    logging, not every step); elsewhere it is the reference loop and an int."""
    if resolve_backend(logits_TE, has_triton=True) == "triton":
        _check_args(init, criterion, max_iters)
        with torch.no_grad():
            d1, iters = sinkhorn_scaling_triton(logits_TE, tol, max_iters, init, SINKHORN_EPS, criterion)
            expert_T = sinkhorn_experts(logits_TE, d1)
    else:
        probs, iters = sinkhorn(logits_TE, tol, max_iters, init, criterion=criterion)
        expert_T = probs.argmax(dim=-1)
    gate_T = torch.sigmoid(logits_TE.gather(-1, expert_T[:, None]).squeeze(-1))
    return expert_T, gate_T, iters
