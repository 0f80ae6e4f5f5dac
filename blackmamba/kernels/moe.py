"""The experts of a top-1 MoE layer: permute tokens by expert, gated MLP per expert, un-permute with the gate.

    y_t = gate_t * W2[e_t] ( act(a) * b ),   [a ; b] = W1[e_t] x_t   (a: rows [0, F) of W1, b: rows [F, 2F))

Expert weights are stacked: ``w1_EFD`` is (E, 2F, D) and ``w2_EDF`` is (E, D, F), the layout of the
released ``linear_fc1`` / ``linear_fc2`` weights stacked over experts. Dropless: every token reaches
its expert whatever the load. ``moe_experts_ref`` is the plain loop over experts with boolean masks;
the fast path sorts tokens by expert once and runs one matrix product per expert on a contiguous slice,
reading the per-expert counts from the device once per call (never once per expert).

On the GPU (backend "triton") nothing is read back to the host: one launch of a counting sort
(:func:`expert_order_triton`) gives the token order grouped by expert and each expert's row offset on the
device (``bincount`` would size its output from a host read of the max), then two grouped GEMMs run over
all experts in one launch each; between them the gated activation is one pass over h.
The grid is an upper bound on the row tiles, ``cdiv(T, BM) + min(E, T)``; each program finds its expert
and row tile from the offsets and exits when it has none, so an expert without tokens costs nothing
and its weights are never read (decode with a few tokens reads only the experts it uses).
:func:`moe_experts_triton` fuses the permutation into the first GEMM (rows gathered) and the
un-permutation and gate into the second (rows scattered and scaled); its backward uses the same kernel
with the weights untransposed for dX and a second kernel, ``dW[e] = dOut[rows e]^T X[rows e]``, for
the weight gradients. :func:`moe_experts_grouped_mm` is the same op on ``torch._grouped_mm`` (CUDA).
:attr:`.settings.KernelSettings.grouped_gemm` picks between them for the "triton" backend, or ("fused")
:func:`.moe_fused.moe_experts_fused`, which also fuses the activation into fc1 and its backward into fc2's.

Numerics: GEMMs accumulate in fp32 (fp32 inputs use IEEE products unless TF32 is allowed for torch
matmuls); the gate multiplies the fp32 accumulator; h and the activation are stored in the experts'
dtype as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import inference_kernels_apply, resolve_backend, triton_interpreted
from .gemv import dequantize
from .settings import get_settings
from .tl_math import ACTIVATIONS, gated

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched

    def _jit(fn):
        return fn


def _kernels_run(t: Tensor) -> bool:
    """Whether this module's Triton kernels can take ``t``: on CUDA, or on the CPU under the interpreter."""
    return triton is not None and (t.is_cuda or triton_interpreted())


def gated_activation(h: Tensor, activation: str) -> Tensor:
    """act(a) * b for h = [a ; b] split in halves along the last axis. On CUDA without autograd through
    ``h``: one launch of :func:`gated_activation_triton`; else :func:`gated_activation_ref`."""
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    if _kernels_run(h) and not needs_grad and h.ndim == 2 and h.shape[1] % 2 == 0:
        return gated_activation_triton(h, activation)
    return gated_activation_ref(h, activation)


def gated_activation_ref(h: Tensor, activation: str) -> Tensor:
    """:func:`gated_activation` in PyTorch ops (act(a) is rounded to h's dtype before the product)."""
    a, b = h.chunk(2, dim=-1)
    if activation == "gelu":
        return F.gelu(a) * b
    if activation == "silu":
        return F.silu(a) * b
    if activation == "gelu_tanh":
        return F.gelu(a, approximate="tanh") * b
    raise ValueError(f"unknown MoE activation {activation!r}")


@_jit
def _gated_activation_kernel(h_ptr, y_ptr, f, stride_h_t, stride_y_t, ACT: tl.constexpr, BLOCK_F: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < f
    a = tl.load(h_ptr + t * stride_h_t + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + t * stride_h_t + f + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    y = gated(a, b, ACT, dtype != tl.float32, dtype)
    tl.store(y_ptr + t * stride_y_t + cols, y.to(dtype), mask=mask)


def gated_activation_triton(h_TF2: Tensor, activation: str) -> Tensor:
    """:func:`gated_activation` of h (T, 2F) in one pass: h read once, (T, F) written once (no autograd)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}; one of {tuple(ACTIVATIONS)}")
    if h_TF2.ndim != 2 or h_TF2.shape[1] % 2:
        raise ValueError(f"gated_activation_triton: h must be (T, 2F), got {tuple(h_TF2.shape)}")
    n_tok, f = h_TF2.shape[0], h_TF2.shape[1] // 2
    h_TF2 = h_TF2 if h_TF2.stride(1) == 1 else h_TF2.contiguous()
    y = torch.empty(n_tok, f, dtype=h_TF2.dtype, device=h_TF2.device)
    if n_tok and f:
        block = min(1024, triton.next_power_of_2(f)) if h_TF2.is_cuda else 16
        _gated_activation_kernel[(n_tok, triton.cdiv(f, block))](
            h_TF2, y, f, h_TF2.stride(0), y.stride(0), ACT=ACTIVATIONS[activation], BLOCK_F=block,
            num_warps=4 if h_TF2.is_cuda else 1,
        )  # fmt: skip
    return y


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
        h = gated_activation_ref(x_TD[mask] @ w1_EFD[e].t(), activation)
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
            outs.append(gated_activation_ref(x_e @ w1_EFD[e].t(), activation) @ w2_EDF[e].t())
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


# The counting sort runs in one program: up to this many tokens it beats torch.sort (H200, 2.8B decode step at
# batch 256: 2.5 us per layer against 27 us for the sort; at 16K tokens, a 8x2048 prefill, 80 us against 47).
COUNTING_SORT_MAX_TOKENS = 4096


def expert_offsets(expert_T: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Stable token order grouping tokens by expert, and row offsets (E+1,) int32 of each expert in that
    order (expert e owns sorted rows [offs[e], offs[e+1])). No host synchronisation. The counting sort where
    :func:`expert_order` takes it, else :func:`expert_offsets_ref`."""
    if _counting_sort(expert_T):
        return expert_order_triton(expert_T, n_experts)[:2]
    return expert_offsets_ref(expert_T, n_experts)


def _counting_sort(expert_T: Tensor) -> bool:
    return _kernels_run(expert_T) and expert_T.shape[0] <= COUNTING_SORT_MAX_TOKENS


def expert_order(expert_T: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`expert_offsets` and ``rank``, the inverse of the order (token t sits at sorted row rank[t]). One
    launch of the counting sort (:func:`expert_order_triton`) where the Triton kernels run and there are at
    most :data:`COUNTING_SORT_MAX_TOKENS` tokens; else :func:`expert_offsets_ref` and a scatter."""
    if _counting_sort(expert_T):
        return expert_order_triton(expert_T, n_experts)
    order_T, offs = expert_offsets_ref(expert_T, n_experts)
    rank_T = torch.empty_like(order_T).scatter_(0, order_T, torch.arange(order_T.shape[0], device=order_T.device))
    return order_T, offs, rank_T


def expert_offsets_ref(expert_T: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """:func:`expert_offsets` by a stable sort and ``searchsorted`` of the expert bounds."""
    sorted_T, order_T = torch.sort(expert_T, stable=True)
    bounds = torch.arange(n_experts + 1, device=expert_T.device, dtype=sorted_T.dtype)
    return order_T, torch.searchsorted(sorted_T, bounds, out_int32=True)


@_jit
def _expert_order_kernel(
    expert_ptr, order_ptr, rank_ptr, offs_ptr, n_tok, n_exp, BLOCK_T: tl.constexpr, E_P2: tl.constexpr
):
    # One program. Pass 1 counts the tokens of each expert; pass 2 gives token t the position
    # offs[e_t] + (tokens of e_t before t), block by block with a running count per expert. An id outside
    # [0, E) counts as expert E: its token goes after every expert's rows, where no GEMM reads it.
    es = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for t0 in range(0, n_tok, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        e = tl.load(expert_ptr + ts, mask=ts < n_tok, other=-1)
        e = tl.where((ts < n_tok) & ((e < 0) | (e >= n_exp)), n_exp, e)
        counts += tl.sum((e[:, None] == es[None, :]).to(tl.int32), axis=0)
    seen = tl.cumsum(counts, axis=0) - counts  # the first sorted row of each expert
    tl.store(offs_ptr + es, seen, mask=es <= n_exp)
    for t0 in range(0, n_tok, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = ts < n_tok
        e = tl.load(expert_ptr + ts, mask=mask, other=-1)
        e = tl.where(mask & ((e < 0) | (e >= n_exp)), n_exp, e)
        hot = (e[:, None] == es[None, :]).to(tl.int32)
        before = tl.cumsum(hot, axis=0) - hot  # tokens of the same expert earlier in this block
        pos = tl.sum((before + seen[None, :]) * hot, axis=1)
        tl.store(order_ptr + pos, ts.to(tl.int64), mask=mask)
        tl.store(rank_ptr + ts, pos.to(tl.int64), mask=mask)
        seen += tl.sum(hot, axis=0)


def expert_order_triton(expert_T: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order (T,) int64, offs (E+1,) int32, rank (T,) int64) in one launch: ``order`` and ``offs`` as
    :func:`expert_offsets_ref` gives them, and ``rank``, the inverse of ``order`` (token t sits at sorted row
    rank[t]), for un-permuting with a gather. Expert ids must lie in [0, E); a token with another id is placed
    after every expert's rows (offs[E] counts only the valid ones), so the others keep their rows."""
    if expert_T.ndim != 1:
        raise ValueError(f"expert_order_triton: expert ids must be (T,), got {tuple(expert_T.shape)}")
    n_tok = expert_T.shape[0]
    order = torch.empty(n_tok, dtype=torch.long, device=expert_T.device)
    rank = torch.empty(n_tok, dtype=torch.long, device=expert_T.device)
    offs = torch.empty(n_experts + 1, dtype=torch.int32, device=expert_T.device)
    e_p2 = max(2, triton.next_power_of_2(n_experts + 1))  # one more slot: ids outside [0, E)
    # Tiles of at most 8K (token, expert) pairs: 32 per thread of the eight warps.
    block = min(max(16, 8192 // e_p2), max(16, triton.next_power_of_2(n_tok))) if expert_T.is_cuda else 16
    _expert_order_kernel[(1,)](
        expert_T.contiguous(), order, rank, offs, n_tok, n_experts, BLOCK_T=block, E_P2=e_p2,
        num_warps=8 if expert_T.is_cuda else 1,
    )  # fmt: skip
    return order, offs, rank


def grouped_gemm_ref(
    a_MK: Tensor,
    b_ENK: Tensor,
    offs: Tensor,
    trans_b: bool = True,
    a_rows: Tensor | None = None,
    c_rows: Tensor | None = None,
    c_scale: Tensor | None = None,
    b_scale: Tensor | None = None,
) -> Tensor:
    """Loop over experts of :func:`grouped_gemm`: sorted row r of expert e is A[a_rows[r]] @ op(B[e]),
    written to row c_rows[r] and scaled by c_scale[c_rows[r]]; op(B) = B^T when trans_b. ``b_scale`` (E, N)
    scales B's output columns (B dequantized in fp32)."""
    a = a_MK if a_rows is None else a_MK[a_rows]
    b = b_ENK.float()
    if b_scale is not None:
        b = b * (b_scale.float()[:, :, None] if trans_b else b_scale.float()[:, None, :])
    out = torch.cat(
        [
            a[lo:hi].float() @ (b[e].t() if trans_b else b[e])
            for e, (lo, hi) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True))
        ]
    )
    if c_rows is not None:
        out = torch.empty_like(out).index_copy(0, c_rows, out)
    if c_scale is not None:
        out = out * c_scale.float()[:, None]
    return out.to(a_MK.dtype)


def grouped_gemm_wgrad_ref(
    a_MN: Tensor,
    b_MK: Tensor,
    offs: Tensor,
    a_rows: Tensor | None = None,
    b_rows: Tensor | None = None,
    a_scale: Tensor | None = None,
) -> Tensor:
    """Loop over experts of :func:`grouped_gemm_wgrad`: dW[e] = (s * A[a_rows])[rows e]^T @ B[b_rows][rows e]."""
    a = a_MN if a_scale is None else (a_MN.float() * a_scale.float()[:, None]).to(a_MN.dtype)
    a = a.float()
    a = a if a_rows is None else a[a_rows]
    b = (b_MK if b_rows is None else b_MK[b_rows]).float()
    bounds = zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)
    return torch.stack([a[lo:hi].t() @ b[lo:hi] for lo, hi in bounds]).to(a_MN.dtype)


@_jit
def _expert_tile(
    pid,
    offs_ptr,
    n_experts,
    n_out,
    m_tiles,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_P2: tl.constexpr,
):
    """(expert, first sorted row, end row of the expert, column tile) of program ``pid``; expert is
    n_experts past the last row tile. Row tiles go GROUP_M at a time for every column tile (L2 reuse);
    expert e owns the row tiles [before_e, before_e + tiles_e)."""
    n_tiles = tl.cdiv(n_out, BN)
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    e = tl.arange(0, E_P2)
    lo = tl.load(offs_ptr + e, mask=e < n_experts, other=0)
    hi = tl.load(offs_ptr + e + 1, mask=e < n_experts, other=0)
    tiles = (hi - lo + BM - 1) // BM
    before = tl.sum(tl.where(e[None, :] < e[:, None], tiles[None, :], 0), 1)
    expert = tl.sum((before + tiles <= pid_m).to(tl.int32), 0)
    mine = e == expert
    row0 = tl.sum(tl.where(mine, lo + (pid_m - before) * BM, 0), 0)
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row0, row_end, pid_n


@_jit
def _gathered_tile_dot(
    a_ptr, src, row_ok, stride_a_m, stride_a_k, b_ptr, expert, stride_b_e, stride_b_k, stride_b_n, cols, col_ok,
    k_red, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """The (BM, BN) fp32 tile A[src] @ op(B[expert]) of a grouped GEMM: rows ``src`` of A (masked by
    ``row_ok``) against columns ``cols`` of expert ``expert``'s B, summed over ``k_red`` in steps of BK."""
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + src[:, None] * stride_a_m + ks[None, :] * stride_a_k
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_b_e + ks[:, None] * stride_b_k + cols[None, :] * stride_b_n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, k_red, BK):
        k_ok = ks < k_red - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        else:  # float8 B -> A's dtype is exact; a no-op for A's own dtype
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK * stride_a_k
        b_ptrs += BK * stride_b_k
    return acc


@_jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offs_ptr,
    a_rows_ptr,
    c_rows_ptr,
    scale_ptr,
    b_scale_ptr,
    n_experts,
    n_out,
    k_red,
    m_tiles,
    stride_a_m,
    stride_a_k,
    stride_b_e,
    stride_b_k,
    stride_b_n,
    stride_c_m,
    stride_c_n,
    stride_bs_e,
    A_GATHER: tl.constexpr,
    C_SCATTER: tl.constexpr,
    C_SCALE: tl.constexpr,
    B_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_P2: tl.constexpr,
):
    expert, row0, row_end, pid_n = _expert_tile(
        tl.program_id(0), offs_ptr, n_experts, n_out, m_tiles, BM, BN, GROUP_M, E_P2
    )
    if expert >= n_experts:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    if A_GATHER:
        src = tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < n_out
    acc = _gathered_tile_dot(
        a_ptr, src, row_ok, stride_a_m, stride_a_k, b_ptr, expert, stride_b_e, stride_b_k, stride_b_n, cols, col_ok,
        k_red, PRECISION, DOT_F32, BM, BN, BK,
    )  # fmt: skip
    if B_SCALE:  # float8 B: one scale per (expert, output column)
        acc = acc * tl.load(b_scale_ptr + expert.to(tl.int64) * stride_bs_e + cols, mask=col_ok, other=0.0)[None, :]
    if C_SCATTER:
        dst = tl.load(c_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        dst = rows.to(tl.int64)
    if C_SCALE:
        acc = acc * tl.load(scale_ptr + dst, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + dst[:, None] * stride_c_m + cols[None, :] * stride_c_n
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@_jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offs_ptr,
    a_rows_ptr,
    b_rows_ptr,
    scale_ptr,
    n_out,
    k_out,
    stride_a_m,
    stride_a_n,
    stride_b_m,
    stride_b_k,
    stride_c_e,
    stride_c_n,
    stride_c_k,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    A_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # One program per (expert, N tile, K tile) reduces over that expert's rows; an expert without
    # tokens only writes its zero tile.
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    k_tiles = tl.cdiv(k_out, BK)
    ns = (pid // k_tiles) * BN + tl.arange(0, BN)
    ks = (pid % k_tiles) * BK + tl.arange(0, BK)
    n_ok = ns < n_out
    k_ok = ks < k_out
    lo = tl.load(offs_ptr + expert)
    hi = tl.load(offs_ptr + expert + 1)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(lo, hi, BM):
        rows = m0 + tl.arange(0, BM)
        row_ok = rows < hi
        if A_GATHER:
            a_src = tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_src = rows.to(tl.int64)
        if B_GATHER:
            b_src = tl.load(b_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            b_src = rows.to(tl.int64)
        a_ptrs = a_ptr + a_src[None, :] * stride_a_m + ns[:, None] * stride_a_n
        a_t = tl.load(a_ptrs, mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        if A_SCALE:
            s = tl.load(scale_ptr + a_src, mask=row_ok, other=0.0).to(tl.float32)
            a_t = a_t.to(tl.float32) * s[None, :]
            if not DOT_F32:
                a_t = a_t.to(a_ptr.dtype.element_ty)
        b_ptrs = b_ptr + b_src[:, None] * stride_b_m + ks[None, :] * stride_b_k
        b = tl.load(b_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            a_t, b = a_t.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_c_e + ns[:, None] * stride_c_n + ks[None, :] * stride_c_k
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _dot_flags(x: Tensor) -> dict:
    """How tl.dot multiplies: fp32 inputs in IEEE fp32 unless torch allows TF32 for matmuls.

    Triton's interpreter (CPU tensors) multiplies bf16 tiles as raw 16-bit integers and truncates fp32 ->
    bf16 casts, so there (DOT_F32) the tiles go to fp32 before tl.dot and the kernels write fp32, which
    torch then rounds; products of bf16 values are exact in fp32, so this matches the GPU's bf16 MMA."""
    interpreted = not x.is_cuda
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted
    return dict(PRECISION="tf32" if tf32 else "ieee", DOT_F32=interpreted and x.dtype != torch.float32)


def _vector_or(v: Tensor | None, unused: Tensor) -> Tensor:
    """An optional row-index or scale vector as the kernels read it (unit stride), or a placeholder."""
    return unused if v is None else v.contiguous()


def _gemm_config(rows: int, n_experts: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Tile sizes: rows per tile follow the mean tokens per expert. Decode (16-row tiles) streams the
    weights, so narrower, deeper tiles spread them over more programs. Small tiles in the interpreter,
    which runs every program on the CPU. Guessed for an H100/H200, not tuned."""
    if not on_gpu:
        return dict(BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=1)
    bm = min(128, max(16, triton.next_power_of_2(triton.cdiv(rows, n_experts))))
    if dtype == torch.float32:
        return dict(BM=min(bm, 64), BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3)
    if bm == 16:
        return dict(BM=16, BN=64, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BM=bm, BN=128, BK=64, GROUP_M=8, num_warps=8 if bm >= 64 else 4, num_stages=4 if bm < 128 else 3)


def _wgrad_config(dtype: torch.dtype, on_gpu: bool) -> dict:
    if not on_gpu:
        return dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=32, BN=64, BK=64, num_warps=4, num_stages=3)
    return dict(BM=64, BN=128, BK=128, num_warps=8, num_stages=3)


def grouped_gemm(
    a_MK: Tensor,
    b_ENK: Tensor,
    offs: Tensor,
    trans_b: bool = True,
    a_rows: Tensor | None = None,
    c_rows: Tensor | None = None,
    c_scale: Tensor | None = None,
    out: Tensor | None = None,
    b_scale: Tensor | None = None,
) -> Tensor:
    """Triton grouped GEMM over rows grouped by expert, in one launch and without host reads.

    Sorted row r in [offs[e], offs[e+1]) is A[a_rows[r]] (A[r] without a_rows) times B[e]^T, with B
    (E, N, K) when ``trans_b``, else times B[e] with B (E, K, N) (the dX of a backward). The result goes
    to row c_rows[r] (or r), scaled by c_scale at that row. Returns (R, N) in A's dtype, R the number of
    sorted rows (a_rows' length, else A's rows), in ``out`` when given; a row no expert owns is left
    unwritten. B may be float8 (e4m3) with ``b_scale`` (E, N) fp32, one scale per expert and output column
    (weight-only quantization, :mod:`blackmamba.layers.quant`): its tiles are converted to A's dtype in
    registers (exact) and each column of the fp32 product is scaled before c_scale and the rounding.
    """
    n_rows = a_rows.shape[0] if a_rows is not None else a_MK.shape[0]
    n_exp, n_out, k_red = b_ENK.shape if trans_b else (b_ENK.shape[0], b_ENK.shape[2], b_ENK.shape[1])
    if a_MK.ndim != 2 or a_MK.shape[1] != k_red or offs.shape != (n_exp + 1,) or offs.dtype != torch.int32:
        raise ValueError(
            f"grouped_gemm: want A (M, {k_red}) and int32 offsets ({n_exp + 1},) for B {tuple(b_ENK.shape)} "
            f"(trans_b={trans_b}); got A {tuple(a_MK.shape)}, offsets {tuple(offs.shape)} {offs.dtype}"
        )
    c = torch.empty(n_rows, n_out, dtype=a_MK.dtype, device=a_MK.device) if out is None else out
    fp8_b = b_ENK.dtype == torch.float8_e4m3fn
    if (a_MK.dtype != b_ENK.dtype and not fp8_b) or c.shape != (n_rows, n_out):
        raise ValueError(
            f"grouped_gemm: want A and B of one dtype (or a float8 B) and out ({n_rows}, {n_out}); got "
            f"{a_MK.dtype}, {b_ENK.dtype}, out {tuple(c.shape)}"
        )
    if fp8_b != (b_scale is not None) or (
        b_scale is not None and (b_scale.shape != (n_exp, n_out) or b_scale.dtype != torch.float32)
    ):
        raise ValueError(
            f"grouped_gemm: a float8 B takes b_scale ({n_exp}, {n_out}) float32, and only it; got B {b_ENK.dtype}, "
            f"b_scale {None if b_scale is None else (tuple(b_scale.shape), b_scale.dtype)}"
        )
    if n_rows == 0:
        return c
    stride_be, stride_b1, stride_b2 = b_ENK.stride()
    stride_bn, stride_bk = (stride_b1, stride_b2) if trans_b else (stride_b2, stride_b1)
    cfg = _gemm_config(n_rows, n_exp, a_MK.dtype, a_MK.is_cuda)
    m_tiles = triton.cdiv(n_rows, cfg["BM"]) + min(n_exp, n_rows)
    grid = (m_tiles * triton.cdiv(n_out, cfg["BN"]),)
    flags = _dot_flags(a_MK)
    c_k = c.float() if flags["DOT_F32"] else c
    b_scale = offs if b_scale is None else b_scale.contiguous()  # a placeholder when unscaled: never read
    _grouped_gemm_kernel[grid](
        a_MK, b_ENK, c_k, offs,
        _vector_or(a_rows, offs), _vector_or(c_rows, offs), _vector_or(c_scale, offs), b_scale,
        n_exp, n_out, k_red, m_tiles,
        a_MK.stride(0), a_MK.stride(1), stride_be, stride_bk, stride_bn, c_k.stride(0), c_k.stride(1),
        b_scale.stride(0) if fp8_b else 0,
        A_GATHER=a_rows is not None, C_SCATTER=c_rows is not None, C_SCALE=c_scale is not None, B_SCALE=fp8_b,
        E_P2=max(2, triton.next_power_of_2(n_exp)), **flags, **cfg,
    )  # fmt: skip
    return c.copy_(c_k) if c_k is not c else c


def grouped_gemm_wgrad(
    a_MN: Tensor,
    b_MK: Tensor,
    offs: Tensor,
    a_rows: Tensor | None = None,
    b_rows: Tensor | None = None,
    a_scale: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Weight gradient of a grouped GEMM: dW[e] = (s * A[a_rows])[rows e]^T @ B[b_rows][rows e], (E, N, K).

    Rows of expert e are the sorted rows [offs[e], offs[e+1]); a_scale scales rows of A before the
    gather. An expert without rows gets zeros. Written to ``out`` when given.
    """
    n_exp = offs.shape[0] - 1
    if a_MN.ndim != 2 or b_MK.ndim != 2 or a_MN.dtype != b_MK.dtype or offs.dtype != torch.int32:
        raise ValueError(
            f"grouped_gemm_wgrad: want A (M, N), B (M, K) of one dtype and int32 offsets; got "
            f"{tuple(a_MN.shape)} {a_MN.dtype}, {tuple(b_MK.shape)} {b_MK.dtype}, offsets {offs.dtype}"
        )
    n_out, k_out = a_MN.shape[1], b_MK.shape[1]
    c = torch.empty(n_exp, n_out, k_out, dtype=a_MN.dtype, device=a_MN.device) if out is None else out
    if c.shape != (n_exp, n_out, k_out):
        raise ValueError(f"grouped_gemm_wgrad: want out {(n_exp, n_out, k_out)}; got {tuple(c.shape)}")
    cfg = _wgrad_config(a_MN.dtype, a_MN.is_cuda)
    grid = (triton.cdiv(n_out, cfg["BN"]) * triton.cdiv(k_out, cfg["BK"]), n_exp)
    flags = _dot_flags(a_MN)
    c_k = c.float() if flags["DOT_F32"] else c
    _grouped_wgrad_kernel[grid](
        a_MN, b_MK, c_k, offs,
        _vector_or(a_rows, offs), _vector_or(b_rows, offs), _vector_or(a_scale, offs),
        n_out, k_out,
        a_MN.stride(0), a_MN.stride(1), b_MK.stride(0), b_MK.stride(1), *c_k.stride(),
        A_GATHER=a_rows is not None, B_GATHER=b_rows is not None, A_SCALE=a_scale is not None,
        **flags, **cfg,
    )  # fmt: skip
    return c.copy_(c_k) if c_k is not c else c


class _MoEExpertsTriton(torch.autograd.Function):
    """permute -> fc1 -> gated activation -> fc2 -> un-permute with the gate, on the grouped GEMMs."""

    @staticmethod
    def forward(ctx, x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation):
        order_T, offs = expert_offsets(expert_T, w1_EFD.shape[0])
        h_TF2 = grouped_gemm(x_TD, w1_EFD, offs, a_rows=order_T)  # sorted rows
        act_TF = gated_activation(h_TF2, activation)
        y_TD = grouped_gemm(act_TF, w2_EDF, offs, c_rows=order_T, c_scale=gate_T)  # token order
        ctx.save_for_backward(x_TD, gate_T, w1_EFD, w2_EDF, order_T, offs, h_TF2)
        ctx.activation = activation
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, gate_T, w1_EFD, w2_EDF, order_T, offs, h_TF2 = ctx.saved_tensors
        need_x, _, need_gate, need_w1, need_w2, _ = ctx.needs_input_grad
        dy_TD = dy_TD.to(h_TF2.dtype)
        dx = dgate = dw1 = dw2 = None
        with torch.enable_grad():
            h = h_TF2.detach().requires_grad_()
            act_TF = gated_activation(h, ctx.activation)
        if need_w2:
            dw2 = grouped_gemm_wgrad(dy_TD, act_TF.detach(), offs, a_rows=order_T, a_scale=gate_T)
        if need_x or need_gate or need_w1:
            g_act_TF = grouped_gemm(dy_TD, w2_EDF, offs, trans_b=False, a_rows=order_T)  # dy[order] @ W2[e]
            gate_sorted = gate_T[order_T].float()[:, None]
            if need_gate:  # d gate_t = <y_unscaled_t, dy_t> = <act_t, dy_t W2[e]>
                dgate_sorted = (act_TF.detach().float() * g_act_TF.float()).sum(-1)
                dgate = torch.empty_like(gate_T).index_copy_(0, order_T, dgate_sorted.to(gate_T.dtype))
            if need_x or need_w1:
                (dh_TF2,) = torch.autograd.grad(act_TF, h, (g_act_TF.float() * gate_sorted).to(h.dtype))
                if need_x:
                    dx = grouped_gemm(dh_TF2, w1_EFD, offs, trans_b=False, c_rows=order_T)
                if need_w1:
                    dw1 = grouped_gemm_wgrad(dh_TF2, x_TD, offs, b_rows=order_T)
        return dx, None, dgate, dw1, dw2, None


def _experts_dtype(x_TD: Tensor, w1_EFD: Tensor, w2_EDF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x and the weights in the experts' compute dtype: autocast's when it is on, else the weights'."""
    device = x_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w1_EFD.dtype
    return x_TD.to(dtype), w1_EFD.to(dtype), w2_EDF.to(dtype)


def moe_experts_triton(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """The experts on the Triton grouped GEMMs (CUDA, or CPU under TRITON_INTERPRET=1); differentiable
    in x, gate, w1 and w2. Expert ids must lie in [0, E). See :func:`moe_experts_ref`."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    x_TD, w1_EFD, w2_EDF = _experts_dtype(x_TD, w1_EFD, w2_EDF)
    with torch.autocast(x_TD.device.type, enabled=False):
        return _MoEExpertsTriton.apply(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)


def moe_experts_grouped_mm(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """The experts on ``torch._grouped_mm`` (autograd by PyTorch). CUDA for training (on the CPU only
    the forward works); CUDA wants bf16 and widths D, F that are multiples of 8. See :func:`moe_experts_ref`."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, gate_T, w1_EFD, w2_EDF))
    if not x_TD.is_cuda and needs_grad:
        raise NotImplementedError("moe_experts_grouped_mm: torch._grouped_mm has no CPU backward here; use CUDA")
    x_TD, w1_EFD, w2_EDF = _experts_dtype(x_TD, w1_EFD, w2_EDF)
    if needs_grad:  # un-permuted by index_copy, whose backward is a gather: no inverse order needed
        order_T, offs = expert_offsets(expert_T, w1_EFD.shape[0])
    else:  # un-permuted by a gather (index_copy's kernel is slower)
        order_T, offs, rank_T = expert_order(expert_T, w1_EFD.shape[0])
    ends = offs[1:]
    with torch.autocast(x_TD.device.type, enabled=False):
        h_TF2 = torch._grouped_mm(x_TD[order_T], w1_EFD.transpose(-2, -1), offs=ends)
        y_TD = torch._grouped_mm(gated_activation(h_TF2, activation), w2_EDF.transpose(-2, -1), offs=ends)
        y_TD = y_TD * gate_T[order_T, None].to(y_TD.dtype)
    if not needs_grad:
        return y_TD[rank_T]
    return y_TD.new_empty(x_TD.shape).index_copy(0, order_T, y_TD)


def moe_experts_fp8(
    x_TD: Tensor,
    expert_T: Tensor,
    gate_T: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    w1_scale: Tensor,
    w2_scale: Tensor,
    activation: str = "gelu",
) -> Tensor:
    """Inference on float8 (e4m3) experts with per-(expert, output channel) fp32 scales, ``w1_scale`` (E, 2F)
    and ``w2_scale`` (E, D): on the "triton" backend and at most the ``fp8_grouped_max_tokens`` setting's
    tokens, the grouped GEMMs read the float8 weights in place (:func:`grouped_gemm` with ``b_scale``);
    otherwise the experts are dequantized to x's dtype and :func:`moe_experts` runs on them. Same result,
    up to rounding order, as :func:`moe_experts_ref` on the dequantized weights. No autograd."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    tokens = x_TD.shape[0]
    if 0 < tokens <= get_settings().fp8_grouped_max_tokens and inference_kernels_apply(x_TD, gate_T):
        order_T, offs = expert_offsets(expert_T, w1_EFD.shape[0])
        h_TF2 = grouped_gemm(x_TD, w1_EFD, offs, a_rows=order_T, b_scale=w1_scale.float())  # sorted rows
        act_TF = gated_activation(h_TF2, activation)
        return grouped_gemm(act_TF, w2_EDF, offs, c_rows=order_T, c_scale=gate_T, b_scale=w2_scale.float())
    w1, w2 = dequantize(w1_EFD, w1_scale, x_TD.dtype), dequantize(w2_EDF, w2_scale, x_TD.dtype)
    return moe_experts(x_TD, expert_T, gate_T, w1, w2, activation)


def _grouped_gemm_choice(x_TD: Tensor, w1_EFD: Tensor) -> str:
    device = x_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w1_EFD.dtype
    fits = x_TD.is_cuda and dtype == torch.bfloat16 and w1_EFD.shape[1] % 16 == 0 and w1_EFD.shape[2] % 8 == 0
    if not fits:
        return "triton"
    settings, tokens = get_settings(), x_TD.shape[0]
    if torch.is_grad_enabled() and (x_TD.requires_grad or w1_EFD.requires_grad):  # training: see settings.py
        return "fused" if tokens < settings.fused_train_max_tokens else "torch"
    return "torch" if tokens >= settings.grouped_mm_min_tokens else "triton"


def moe_experts(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """The MoE experts on the selected backend; see :func:`moe_experts_ref`. The "triton" backend runs
    the grouped GEMM named by the ``grouped_gemm`` setting (by default chosen by the token count)."""
    backend = resolve_backend(x_TD, has_triton=True)
    if backend == "ref":
        impl = moe_experts_ref
    elif backend == "triton":
        from .moe_fused import moe_experts_fused  # imports this module

        impls = {"triton": moe_experts_triton, "torch": moe_experts_grouped_mm, "fused": moe_experts_fused}
        choice = get_settings().grouped_gemm
        impl = impls[_grouped_gemm_choice(x_TD, w1_EFD) if choice == "auto" else choice]
    else:
        impl = moe_experts_sorted
    return impl(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
