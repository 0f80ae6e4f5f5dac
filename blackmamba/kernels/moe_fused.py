"""The MoE experts for training with every elementwise step fused into a GEMM: six launches, no (T, 2F) pass.

    y_t = gate_t * W2[e_t] ( act(a) * b ),   [a ; b] = W1[e_t] x_t   (the op of :func:`.moe.moe_experts_ref`)

Tokens are grouped by expert with device-side offsets (:func:`.moe.expert_offsets`), as in
:func:`.moe.moe_experts_triton`; every kernel runs over all experts in one launch and finds its expert and
row tile from the offsets, so nothing is read back to the host. Rows are in the sorted order throughout;
``order`` maps a sorted row to its token.

Forward (two launches):

* ``fc1``: a program computes the (BM, BN) tiles of both halves, a = x[order] W1[e, :F]^T and
  b = x[order] W1[e, F:]^T, with the rows gathered in the A-operand load, and writes act(a) * b (T, F).
  For the backward it also writes h = [a ; b] (T, 2F) from the same epilogue (no separate pass).
* ``fc2``: y[order] = gate * act W2[e]^T, scattered back to token order with the gate in the epilogue
  (the kernel of :mod:`.moe`). Top-1 routing writes each token's row once: no reduction.

Backward (four launches and a (T, F/BN) sum):

* ``dact``: g = dy[order] W2[e] with rows gathered; its epilogue reads h, recomputes act(a) and act'(a),
  and writes dh = [gate g b act'(a) ; gate g act(a)] (T, 2F), gate * act(a) * b (T, F) for dW2, and one
  partial <act, g> per row and column tile for the gate's gradient.
* ``dx``: dx[order] = dh W1[e], scattered (the kernel of :mod:`.moe`).
* ``dW2`` and ``dW1``: one grouped weight-gradient GEMM each over all experts (the kernel of :mod:`.moe`):
  dW2[e] = dy[order][rows e]^T (gate act)[rows e], dW1[e] = dh[rows e]^T x[order][rows e].

Saved for the backward: x, gate, the weights, the order and offsets, and h (what the unfused path keeps).

Numerics as in the reference on the GPU: fp32 accumulators; a, b, act(a) and act(a) * b rounded to the
experts' dtype; the gate multiplies fp32 values. The backward's elementwise terms stay in fp32 until
stored. In Triton's interpreter (CPU) the kernels compute and write fp32, which torch then rounds.

Tiles come from the ``moe_train_tiles`` setting, one entry per kernel; :attr:`.settings.KernelSettings.
grouped_gemm` = "fused" selects this path for the "triton" backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moe import (
    _check,
    _dot_flags,
    _expert_tile,
    _experts_dtype,
    _gathered_tile_dot,
    _grouped_gemm_kernel,
    _grouped_wgrad_kernel,
    expert_offsets,
    moe_experts_ref,
)
from .settings import get_settings
from .tl_math import ACTIVATIONS

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched

    def _jit(fn):
        return fn


@_jit
def _act_and_grad(a, ACT: tl.constexpr):
    """act(a) and act'(a) in fp32: GELU (erf), SiLU or GELU (tanh), as ACTIVATIONS numbers them."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        act = a * cdf
        grad = cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 1:
        s = tl.sigmoid(a)
        act = a * s
        grad = s * (1.0 + a * (1.0 - s))
    else:  # 0.5 a (1 + tanh(u)), tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        act = 0.5 * a * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
    return act, grad


@_jit
def _fc1_gated_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    act_ptr,
    offs_ptr,
    order_ptr,
    n_experts,
    ff,
    dim,
    m_tiles,
    stride_x_m,
    stride_x_k,
    stride_w_e,
    stride_w_n,
    stride_w_k,
    stride_h_m,
    stride_h_n,
    stride_o_m,
    stride_o_n,
    ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_P2: tl.constexpr,
):
    expert, row0, row_end, pid_n = _expert_tile(
        tl.program_id(0), offs_ptr, n_experts, ff, m_tiles, BM, BN, GROUP_M, E_P2
    )
    if expert >= n_experts:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    src = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < ff
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + src[:, None] * stride_x_m + ks[None, :] * stride_x_k
    wa_ptrs = w_ptr + expert.to(tl.int64) * stride_w_e + ks[:, None] * stride_w_k + cols[None, :] * stride_w_n
    wb_ptrs = wa_ptrs + ff * stride_w_n
    acc_a = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, dim, BK):
        k_ok = ks < dim - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wa = tl.load(wa_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wb = tl.load(wb_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            x, wa, wb = x.to(tl.float32), wa.to(tl.float32), wb.to(tl.float32)
        acc_a = tl.dot(x, wa, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(x, wb, acc_b, input_precision=PRECISION)
        x_ptrs += BK * stride_x_k
        wa_ptrs += BK * stride_w_k
        wb_ptrs += BK * stride_w_k
    dtype = act_ptr.dtype.element_ty
    if ROUND:  # h is stored in the experts' dtype in the reference
        acc_a = acc_a.to(dtype).to(tl.float32)
        acc_b = acc_b.to(dtype).to(tl.float32)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    if STORE_H:
        h_ptrs = h_ptr + rows64[:, None] * stride_h_m + cols[None, :] * stride_h_n
        tl.store(h_ptrs, acc_a.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptrs + ff * stride_h_n, acc_b.to(h_ptr.dtype.element_ty), mask=mask)
    act_a, _ = _act_and_grad(acc_a, ACT)
    if ROUND:
        act_a = act_a.to(dtype).to(tl.float32)
    tl.store(act_ptr + rows64[:, None] * stride_o_m + cols[None, :] * stride_o_n, (act_a * acc_b).to(dtype), mask=mask)


@_jit
def _fc2_dgrad_gated_kernel(
    dy_ptr,
    w_ptr,
    h_ptr,
    gate_ptr,
    dh_ptr,
    actg_ptr,
    dgate_ptr,
    offs_ptr,
    order_ptr,
    n_experts,
    ff,
    dim,
    m_tiles,
    stride_dy_m,
    stride_dy_k,
    stride_w_e,
    stride_w_k,
    stride_w_n,
    stride_h_m,
    stride_h_n,
    stride_dh_m,
    stride_dh_n,
    stride_ag_m,
    stride_ag_n,
    stride_dg_m,
    ACT: tl.constexpr,
    STORE_DH: tl.constexpr,
    STORE_ACTG: tl.constexpr,
    STORE_DGATE: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_P2: tl.constexpr,
):
    expert, row0, row_end, pid_n = _expert_tile(
        tl.program_id(0), offs_ptr, n_experts, ff, m_tiles, BM, BN, GROUP_M, E_P2
    )
    if expert >= n_experts:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    src = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < ff
    # g = dy[order] W2[e]: W2 is (E, D, F), so the reduction runs over its D axis.
    g = _gathered_tile_dot(
        dy_ptr, src, row_ok, stride_dy_m, stride_dy_k, w_ptr, expert, stride_w_e, stride_w_k, stride_w_n, cols,
        col_ok, dim, PRECISION, DOT_F32, BM, BN, BK,
    )  # fmt: skip
    mask = row_ok[:, None] & col_ok[None, :]
    # Offsets inside the tile in int32 from per-tile base pointers: fewer 64-bit values live in the epilogue.
    tile_rows = tl.arange(0, BM)[:, None]
    h_tile = h_ptr + row0.to(tl.int64) * stride_h_m + tile_rows * stride_h_m + cols[None, :] * stride_h_n
    a = tl.load(h_tile, mask=mask, other=0.0).to(tl.float32)
    act_a, grad_a = _act_and_grad(a, ACT)
    dtype = dh_ptr.dtype.element_ty
    if ROUND:  # act(a) and act(a) * b as the forward rounded them
        act_a = act_a.to(dtype).to(tl.float32)
    b = tl.load(h_tile + ff * stride_h_n, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + src, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    act = act_a * b
    if ROUND:
        act = act.to(dtype).to(tl.float32)
    if STORE_DGATE:  # d gate = <act W2^T, dy> = <act, g>: one partial sum per column tile, in token order
        part = tl.sum(tl.where(mask, act * g, 0.0), 1)
        tl.store(dgate_ptr + src * stride_dg_m + pid_n, part, mask=row_ok)
    if STORE_ACTG:
        ag_tile = actg_ptr + row0.to(tl.int64) * stride_ag_m + tile_rows * stride_ag_m + cols[None, :] * stride_ag_n
        tl.store(ag_tile, (act * gate).to(actg_ptr.dtype.element_ty), mask=mask)
    if STORE_DH:
        g = g * gate
        dh_tile = dh_ptr + row0.to(tl.int64) * stride_dh_m + tile_rows * stride_dh_m + cols[None, :] * stride_dh_n
        tl.store(dh_tile + ff * stride_dh_n, (g * act_a).to(dtype), mask=mask)
        tl.store(dh_tile, (g * b * grad_a).to(dtype), mask=mask)


KERNELS = ("fc1", "fc2", "dact", "dx", "wgrad")


def tiles_for(kernel: str, rows: int, n_experts: int, dtype: torch.dtype, on_gpu: bool) -> dict[str, int]:
    """Launch parameters of one kernel of this path: the ``moe_train_tiles`` setting for bf16 on the GPU, with
    the row tile cut to the mean tokens per expert (at least 16) and smaller tiles for fp32; tiny tiles in
    the interpreter, which runs every program on the CPU."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    if not on_gpu:
        return dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=1) | ({} if kernel == "wgrad" else dict(GROUP_M=2))
    cfg = dict(get_settings().moe_train_tiles[kernel])
    if kernel != "wgrad":
        mean = triton.cdiv(rows, n_experts)
        cfg["BM"] = min(cfg["BM"], max(16, triton.next_power_of_2(mean)))
        if cfg["BM"] < 64:
            cfg["num_warps"] = min(cfg["num_warps"], 4)
    if dtype == torch.float32:  # twice the bytes per element: halve the K step
        cfg["BK"] = max(16, cfg["BK"] // 2)
        cfg["num_stages"] = min(cfg["num_stages"], 3)
    return cfg


def _out(rows: int, cols: int, dtype: torch.dtype, like: Tensor, flags: dict) -> Tensor:
    """An output the kernels write: fp32 in the interpreter (torch rounds it after), else ``dtype``."""
    return torch.empty(rows, cols, dtype=torch.float32 if flags["DOT_F32"] else dtype, device=like.device)


def _m_tiles(rows: int, n_exp: int, bm: int) -> int:
    """Row tiles the grid covers: enough for every expert's last, partial tile."""
    return triton.cdiv(rows, bm) + min(n_exp, rows)


def fc1_gated(
    x_TD: Tensor, w1_EFD: Tensor, order_T: Tensor, offs: Tensor, activation: str, store_h: bool
) -> tuple[Tensor | None, Tensor]:
    """(h (T, 2F) or None, act(a) * b (T, F)), both in sorted rows, from x (T, D) gathered by ``order``."""
    n_tok, dim = x_TD.shape
    n_exp, two_f, _ = w1_EFD.shape
    ff = two_f // 2
    flags = _dot_flags(x_TD)
    cfg = tiles_for("fc1", n_tok, n_exp, x_TD.dtype, x_TD.is_cuda)
    h = _out(n_tok, two_f, x_TD.dtype, x_TD, flags) if store_h else None
    act = _out(n_tok, ff, x_TD.dtype, x_TD, flags)
    m_tiles = _m_tiles(n_tok, n_exp, cfg["BM"])
    h_k = act if h is None else h
    grid = (m_tiles * triton.cdiv(ff, cfg["BN"]),)
    _fc1_gated_kernel[grid](
        x_TD, w1_EFD, h_k, act, offs, order_T, n_exp, ff, dim, m_tiles,
        x_TD.stride(0), x_TD.stride(1), *w1_EFD.stride(), h_k.stride(0), h_k.stride(1), act.stride(0), act.stride(1),
        ACT=ACTIVATIONS[activation], STORE_H=store_h, ROUND=not flags["DOT_F32"] and x_TD.dtype != torch.float32,
        E_P2=max(2, triton.next_power_of_2(n_exp)), **flags, **cfg,
    )  # fmt: skip
    return (None if h is None else h.to(x_TD.dtype)), act.to(x_TD.dtype)


def fc2_dgrad_gated(
    dy_TD: Tensor,
    w2_EDF: Tensor,
    h_TF2: Tensor,
    gate_T: Tensor,
    order_T: Tensor,
    offs: Tensor,
    activation: str,
    need_dh: bool = True,
    need_actg: bool = True,
    need_dgate: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dh (T, 2F), gate * act (T, F), both in sorted rows; d gate (T,) in token order and gate's dtype), each
    None when not asked for, from the output gradient dy (T, D) in token order and the saved h."""
    n_tok, dim = dy_TD.shape
    n_exp, _, ff = w2_EDF.shape
    dtype = h_TF2.dtype
    flags = _dot_flags(h_TF2)
    cfg = tiles_for("dact", n_tok, n_exp, dtype, dy_TD.is_cuda)
    n_tiles = triton.cdiv(ff, cfg["BN"])
    dh = _out(n_tok, 2 * ff, dtype, dy_TD, flags) if need_dh else None
    actg = _out(n_tok, ff, dtype, dy_TD, flags) if need_actg else None
    parts = torch.empty(n_tok, n_tiles, dtype=torch.float32, device=dy_TD.device) if need_dgate else None
    dh_k = h_TF2 if dh is None else dh  # placeholders of the right type for outputs not written
    actg_k = h_TF2 if actg is None else actg
    parts_k = gate_T if parts is None else parts
    m_tiles = _m_tiles(n_tok, n_exp, cfg["BM"])
    _fc2_dgrad_gated_kernel[(m_tiles * n_tiles,)](
        dy_TD, w2_EDF, h_TF2, gate_T, dh_k, actg_k, parts_k, offs, order_T, n_exp, ff, dim, m_tiles,
        dy_TD.stride(0), dy_TD.stride(1), *w2_EDF.stride(), h_TF2.stride(0), h_TF2.stride(1),
        dh_k.stride(0), dh_k.stride(1), actg_k.stride(0), actg_k.stride(1), parts_k.stride(0),
        ACT=ACTIVATIONS[activation], STORE_DH=need_dh, STORE_ACTG=need_actg, STORE_DGATE=need_dgate,
        ROUND=not flags["DOT_F32"] and dtype != torch.float32,
        E_P2=max(2, triton.next_power_of_2(n_exp)), **flags, **cfg,
    )  # fmt: skip
    dgate = None if parts is None else parts.sum(1).to(gate_T.dtype)
    return (None if dh is None else dh.to(dtype)), (None if actg is None else actg.to(dtype)), dgate


def gemm_scatter(
    a_MK: Tensor, b_E: Tensor, offs: Tensor, order_T: Tensor, trans_b: bool, kernel: str, scale: Tensor | None = None
) -> Tensor:
    """out[order[r]] = scale[order[r]] * A[r] op(B[e]) for sorted rows r of expert e (op(B) = B^T when
    ``trans_b``): fc2 (B = W2, gate scale) and dx (B = W1), on the grouped GEMM kernel of :mod:`.moe`."""
    n_rows = a_MK.shape[0]
    n_exp = b_E.shape[0]
    n_out, k_red = (b_E.shape[1], b_E.shape[2]) if trans_b else (b_E.shape[2], b_E.shape[1])
    stride_be, stride_b1, stride_b2 = b_E.stride()
    stride_bn, stride_bk = (stride_b1, stride_b2) if trans_b else (stride_b2, stride_b1)
    flags = _dot_flags(a_MK)
    cfg = tiles_for(kernel, n_rows, n_exp, a_MK.dtype, a_MK.is_cuda)
    c = _out(n_rows, n_out, a_MK.dtype, a_MK, flags)
    m_tiles = _m_tiles(n_rows, n_exp, cfg["BM"])
    _grouped_gemm_kernel[(m_tiles * triton.cdiv(n_out, cfg["BN"]),)](
        a_MK, b_E, c, offs, offs, order_T, order_T if scale is None else scale, offs,
        n_exp, n_out, k_red, m_tiles,
        a_MK.stride(0), a_MK.stride(1), stride_be, stride_bk, stride_bn, c.stride(0), c.stride(1), 0,
        A_GATHER=False, C_SCATTER=True, C_SCALE=scale is not None, B_SCALE=False,
        E_P2=max(2, triton.next_power_of_2(n_exp)), **flags, **cfg,
    )  # fmt: skip
    return c.to(a_MK.dtype)


def weight_grad(a_MN: Tensor, b_MK: Tensor, offs: Tensor, order_T: Tensor, gather_a: bool) -> Tensor:
    """dW[e] = A'[rows e]^T B'[rows e] (E, N, K) over all experts in one launch, where the operand named by
    ``gather_a`` (A, else B) is in token order and read through ``order``, the other in sorted rows."""
    n_exp = offs.shape[0] - 1
    n_out, k_out = a_MN.shape[1], b_MK.shape[1]
    flags = _dot_flags(a_MN)
    cfg = tiles_for("wgrad", a_MN.shape[0], n_exp, a_MN.dtype, a_MN.is_cuda)
    c = torch.empty(n_exp, n_out, k_out, dtype=torch.float32 if flags["DOT_F32"] else a_MN.dtype, device=a_MN.device)
    _grouped_wgrad_kernel[(triton.cdiv(n_out, cfg["BN"]) * triton.cdiv(k_out, cfg["BK"]), n_exp)](
        a_MN, b_MK, c, offs, order_T, order_T, offs, n_out, k_out,
        a_MN.stride(0), a_MN.stride(1), b_MK.stride(0), b_MK.stride(1), *c.stride(),
        A_GATHER=gather_a, B_GATHER=not gather_a, A_SCALE=False, **flags, **cfg,
    )  # fmt: skip
    return c.to(a_MN.dtype)


class _MoEExpertsFused(torch.autograd.Function):
    """fc1 with gather and activation, fc2 with scatter and gate; backward as in the module docstring."""

    @staticmethod
    def forward(ctx, x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation):
        order_T, offs = expert_offsets(expert_T, w1_EFD.shape[0])
        gate_T = gate_T.contiguous()  # the kernels read the gate with unit stride
        need_x, _, need_gate, need_w1, need_w2, _ = ctx.needs_input_grad
        training = need_x or need_gate or need_w1 or need_w2
        h_TF2, act_TF = fc1_gated(x_TD, w1_EFD, order_T, offs, activation, store_h=training)
        y_TD = gemm_scatter(act_TF, w2_EDF, offs, order_T, trans_b=True, kernel="fc2", scale=gate_T)
        if training:
            ctx.save_for_backward(x_TD, gate_T, w1_EFD, w2_EDF, order_T, offs, h_TF2)
        ctx.activation = activation
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, gate_T, w1_EFD, w2_EDF, order_T, offs, h_TF2 = ctx.saved_tensors
        need_x, _, need_gate, need_w1, need_w2, _ = ctx.needs_input_grad
        dy_TD = dy_TD.to(h_TF2.dtype)
        dh_TF2, actg_TF, dgate = fc2_dgrad_gated(
            dy_TD, w2_EDF, h_TF2, gate_T, order_T, offs, ctx.activation,
            need_dh=need_x or need_w1, need_actg=need_w2, need_dgate=need_gate,
        )  # fmt: skip
        dw2 = weight_grad(dy_TD, actg_TF, offs, order_T, gather_a=True) if need_w2 else None
        dx = gemm_scatter(dh_TF2, w1_EFD, offs, order_T, trans_b=False, kernel="dx") if need_x else None
        dw1 = weight_grad(dh_TF2, x_TD, offs, order_T, gather_a=False) if need_w1 else None
        return dx, None, dgate, dw1, dw2, None


def moe_experts_fused(
    x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, activation: str = "gelu"
) -> Tensor:
    """The experts with the permutation, activation and gate fused into the GEMMs (CUDA, or CPU under
    TRITON_INTERPRET=1); differentiable in x, gate, w1 and w2. Expert ids must lie in [0, E). See
    :func:`.moe.moe_experts_ref`."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}; one of {tuple(ACTIVATIONS)}")
    if x_TD.shape[0] == 0:  # nothing to launch for; the loop returns the empty output with its autograd graph
        return moe_experts_ref(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
    x_TD, w1_EFD, w2_EDF = _experts_dtype(x_TD, w1_EFD, w2_EDF)
    with torch.autocast(x_TD.device.type, enabled=False):
        return _MoEExpertsFused.apply(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
