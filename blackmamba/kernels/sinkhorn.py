"""Sinkhorn routing's column scaling in one launch, with nothing read back to the host.

:func:`blackmamba.routing.sinkhorn` iterates until a convergence test passes, and reading that test's
result on the host (``bool(tensor)``) stalls the CPU until the GPU has caught up, once per iteration and
MoE layer. The GPU then sits idle while the CPU launches the next kernels: in a 2.8B training step the
eighteen MoE layers' waits expose the host's whole launch cost (with FSDP's per-block hooks, most of the
step). This kernel runs the same iteration in a single program, tests convergence on the device and
stops there, and leaves the column scaling d1 (E,) and the iteration count in device memory.

C = exp(2 * min(logits, 40)) is computed once by a parallel kernel (``Tiles.cost_first``; otherwise each pass
recomputes it from the logits), and each pass streams the (T, E) matrix in row tiles:

    d0 = (1 / T) / (C d1 + eps)                            (per row)
    d1' = (1 / E) / (d0^T C + eps)                         (per column)
    "released":  mean |d1' - d1| <= tol
    "marginals": max over rows of |d0 * (C d1') * T - 1| <= tol   (a second pass)

with d1 = 1 / (E * column sums of C) first ("zyphra") or ones. The expert of token t is the argmax over e
of P[t, e] = d0[t] C[t, e] d1[e]; d0[t] > 0 scales a whole row, so :func:`sinkhorn_experts` takes the
argmax of C[t, e] d1[e]. The sums run in another order than the reference's matrix products, so d1
agrees to fp32 rounding and the chosen experts agree except on exact near-ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the "triton" backend then refuses to run
    triton = None

_BLOCK_T = 256


if triton is not None:

    @triton.jit
    def _cost_tile(
        logits_ptr, t0, n_tok, n_exp, stride_t, BLOCK_T: tl.constexpr, E_P2: tl.constexpr, COST: tl.constexpr
    ):
        """C of rows [t0, t0 + BLOCK_T) (zero outside the matrix) and the rows' mask; ``COST``: the pointer
        holds C itself (computed once before the iteration), not the logits."""
        rows = t0 + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, E_P2)
        ok_t = rows < n_tok
        mask = ok_t[:, None] & (cols < n_exp)[None, :]
        logits = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
        if COST:
            cost = logits
        else:
            cost = tl.where(mask, tl.exp(2.0 * tl.minimum(logits.to(tl.float32), 40.0)), 0.0)
        return cost, ok_t

    @triton.jit(do_not_specialize=["n_tok", "n_exp", "max_iters"])
    def _sinkhorn_kernel(
        logits_ptr, d1_ptr, iters_ptr, n_tok, n_exp, stride_t, tol, max_iters,
        EPS: tl.constexpr, ZYPHRA: tl.constexpr, MARGINALS: tl.constexpr, BLOCK_T: tl.constexpr, E_P2: tl.constexpr,
        COST: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        # EPS is a compile-time constant: a float argument can arrive as fp64 (torch.compile passes Python
        # floats that way) and would turn the fp32 iteration into fp64.
        cols = tl.arange(0, E_P2)
        ok_e = cols < n_exp
        inv_t = 1.0 / n_tok.to(tl.float32)
        inv_e = 1.0 / n_exp.to(tl.float32)
        if ZYPHRA:
            mass = tl.zeros((E_P2,), tl.float32)
            for t0 in tl.range(0, n_tok, BLOCK_T, num_stages=STAGES):
                cost, ok_t = _cost_tile(logits_ptr, t0, n_tok, n_exp, stride_t, BLOCK_T, E_P2, COST)
                mass += tl.sum(cost, axis=0)
            d1 = tl.where(ok_e, 1.0 / (n_exp.to(tl.float32) * mass), 0.0)
        else:
            d1 = tl.where(ok_e, 1.0, 0.0)
        iters = tl.zeros((), tl.int32)
        going = iters < max_iters
        while going:
            col = tl.zeros((E_P2,), tl.float32)
            for t0 in tl.range(0, n_tok, BLOCK_T, num_stages=STAGES):
                cost, ok_t = _cost_tile(logits_ptr, t0, n_tok, n_exp, stride_t, BLOCK_T, E_P2, COST)
                d0 = inv_t / (tl.sum(cost * d1[None, :], axis=1) + EPS)
                col += tl.sum(d0[:, None] * cost, axis=0)
            d1_new = tl.where(ok_e, inv_e / (col + EPS), 0.0)
            if MARGINALS:
                worst = tl.zeros((BLOCK_T,), tl.float32)
                for t0 in tl.range(0, n_tok, BLOCK_T, num_stages=STAGES):
                    cost, ok_t = _cost_tile(logits_ptr, t0, n_tok, n_exp, stride_t, BLOCK_T, E_P2, COST)
                    d0 = inv_t / (tl.sum(cost * d1[None, :], axis=1) + EPS)
                    mass_t = d0 * tl.sum(cost * d1_new[None, :], axis=1) * n_tok.to(tl.float32)
                    worst = tl.maximum(worst, tl.where(ok_t, tl.abs(mass_t - 1.0), 0.0))
                converged = (tl.max(worst, axis=0) <= tol).to(tl.int32)
            else:
                converged = (tl.sum(tl.abs(d1_new - d1), axis=0) * inv_e <= tol).to(tl.int32)
            d1 = d1_new
            iters += 1
            going = (iters < max_iters) & (converged == 0)
        tl.store(d1_ptr + cols, d1, mask=ok_e)
        tl.store(iters_ptr, iters)


class Tiles(NamedTuple):
    """Launch settings of the single-program kernel: rows per tile, warps, software-pipeline stages of the
    row loop, and whether C = exp(2 min(logits, 40)) is computed once by a parallel kernel first (then the
    serial iterations stream C and compute no exp)."""

    block_t: int = _BLOCK_T
    warps: int = 4
    stages: int = 1
    cost_first: bool = False


# benchmarks/tune/sinkhorn_tiles.py on the H200 (results/sinkhorn_tiles.json): 8.3 us per iteration at 8K tokens x 8
# experts against 56.4 with Tiles() (256-row tiles, 4 warps, exp in the loop); 18.5 against 120 at 16K, 80 against
# 483 at 64K. Pipelining the row loop (stages 2) made the 2048-row tiles slower (30 us at 8K).
TILES = Tiles(block_t=2048, warps=16, stages=1, cost_first=True)


def sinkhorn_scaling_triton(
    logits_TE: Tensor, tol: float, max_iters: int, init: str, eps: float, criterion: str, tiles: Tiles | None = None
) -> tuple[Tensor, Tensor]:
    """(d1 (E,) fp32, iterations () int32), both on the logits' device; see the module docstring. ``tiles``
    overrides :data:`TILES` (for the tuning script)."""
    if triton is None:
        raise RuntimeError("the Triton Sinkhorn kernel needs the triton package")
    if logits_TE.dim() != 2 or logits_TE.shape[0] < 1 or logits_TE.shape[1] < 1:
        raise ValueError(f"router logits must be (tokens, experts) with both >= 1, got {tuple(logits_TE.shape)}")
    tiles = tiles or TILES
    logits = logits_TE.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if tiles.cost_first:
        logits = torch.exp(2.0 * logits.clamp(max=40.0))
    n_tok, n_exp = logits.shape
    d1 = torch.empty(n_exp, dtype=torch.float32, device=logits.device)
    iters = torch.empty((), dtype=torch.int32, device=logits.device)
    _sinkhorn_kernel[(1,)](
        logits, d1, iters, n_tok, n_exp, logits.stride(0), float(tol), int(max_iters), EPS=float(eps),
        ZYPHRA=init == "zyphra", MARGINALS=criterion == "marginals", BLOCK_T=tiles.block_t,
        E_P2=triton.next_power_of_2(n_exp), COST=tiles.cost_first, STAGES=tiles.stages, num_warps=tiles.warps,
    )  # fmt: skip
    return d1, iters


def sinkhorn_experts(logits_TE: Tensor, d1_E: Tensor) -> Tensor:
    """The expert of each token: argmax over e of exp(2 * min(logit, 40)) * d1[e] (the row scaling d0 does
    not change a row's argmax)."""
    return (torch.exp(2 * logits_TE.float().clamp(max=40.0)) * d1_E).argmax(dim=-1)
