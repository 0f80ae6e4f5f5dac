"""Mamba's selective scan (the S6 recurrence, Gu & Dao 2023, Algorithm 2), in (B, L, D_in) layout.

For every channel c and state n, with h_{-1} = initial_state (zero by default):

    dt_t    = softplus(delta_t + delta_bias)                 (when delta_softplus)
    h_t     = exp(dt_t[c] * A[c, n]) * h_{t-1} + dt_t[c] * B_t[n] * u_t[c]
    y_t[c]  = sum_n h_t[c, n] * C_t[n] + D[c] * u_t[c]
    y_t     = y_t * silu(z_t)                                 (when z is given)

Numerics: the state, dt, A, D and the accumulation stay in fp32 whatever the input dtype; ``y`` is
returned in ``u``'s dtype and the final state in fp32.

``selective_scan_ref`` is the sequential definition. ``selective_scan_chunked`` is the fast PyTorch path:
the sequence is cut into chunks of length Q; (1) a scan from a zero state runs in all chunks at once
(Q vectorised steps) and gives each chunk's local end state, (2) the chunk start states are carried
across chunks (L/Q steps), (3) the recurrence runs again inside every chunk from its true start state and
reads y out. That is about 2*sqrt(L) + Q Python steps instead of L; every exponent, dt * A, is <= 0, so
nothing overflows. Without autograd it works in place on channel blocks; with autograd a custom
backward runs the adjoint recurrence backwards with the same chunking (see ``_ChunkedScan``).

``selective_scan_triton`` is the GPU path: fused Triton kernels for the forward (split over the sequence
when the batch is small) and the backward, described above the kernels below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths work without Triton
    triton = None


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None):
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must be (B, L, D_in), got shape {tuple(u.shape)}")
    batch, length, d_inner = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise ValueError(f"selective_scan: A must be (D_in={d_inner}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, length, n):
            raise ValueError(f"selective_scan: {name} must be {(batch, length, n)}, got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (batch, d_inner, n):
        raise ValueError(
            f"selective_scan: initial_state must be {(batch, d_inner, n)}, got {tuple(initial_state.shape)}"
        )


def _prepare_dt(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    return F.softplus(dt) if delta_softplus else dt


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference. u, delta, z: (B, L, D_in); A: (D_in, N); B, C: (B, L, N); D, delta_bias: (D_in,);
    initial_state: (B, D_in, N). Returns y (B, L, D_in) and, if asked, the final state (B, D_in, N) fp32."""
    _check_inputs(u, delta, A, B, C, initial_state)
    batch, length, d_inner = u.shape
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    A32, B32, C32, u32 = A.float(), B.float(), C.float(), u.float()
    h = u32.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None] * A32)
        h = decay * h + (dt[:, t] * u32[:, t])[:, :, None] * B32[:, t, None, :]
        ys.append(torch.einsum("bcn,bn->bc", h, C32[:, t]))
    y = torch.stack(ys, dim=1) if ys else u32.new_zeros(batch, 0, d_inner)
    out = _finish(y, u, D, z)
    return (out, h) if return_final_state else out


def _chunk_size(length: int) -> int:
    return max(1, min(length, 2 ** round(math.log2(max(1.0, math.sqrt(length))))))


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked parallel scan; same arguments and results as :func:`selective_scan_ref`."""
    _check_inputs(u, delta, A, B, C, initial_state)
    batch, length, d_inner = u.shape
    n = A.shape[1]
    A32 = A.float()
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    if length == 0:
        h0 = u.new_zeros(batch, d_inner, n, dtype=torch.float32) if initial_state is None else initial_state
        out = _finish(dt.new_zeros(batch, 0, d_inner), u, D, z)
        return (out, h0.float()) if return_final_state else out
    q = chunk_size or _chunk_size(length)
    n_chunks = -(-length // q)
    pad = n_chunks * q - length
    u32 = u.float()
    du = dt * u32
    B32, C32 = B.float(), C.float()
    if pad:
        # dt = 0 in the padding: decay 1 and no input, so the state passes through unchanged.
        dt, du, u32 = F.pad(dt, (0, 0, 0, pad)), F.pad(du, (0, 0, 0, pad)), F.pad(u32, (0, 0, 0, pad))
        B32, C32 = F.pad(B32, (0, 0, 0, pad)), F.pad(C32, (0, 0, 0, pad))
    state0 = dt.new_zeros(batch, d_inner, n) if initial_state is None else initial_state.float()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    if needs_grad:
        y, state = _ChunkedScan.apply(dt, u32, A32, B32, C32, state0, q)
    else:
        y, state, _ = _chunk_scan_inplace(dt, du, B32, C32, A32, state0, q)
    out = _finish(y[:, :length], u, D, z)
    return (out, state) if return_final_state else out


# Channels per block in the in-place path: small enough that one step's (B, n_chunks, block, N) buffers
# stay in a core's cache, large enough that Python overhead per op stays small.
_INPLACE_BLOCK_ELEMS = 2**20


def _chunk_scan_inplace(dt: Tensor, du: Tensor, B: Tensor, C: Tensor, A: Tensor, state0: Tensor, q: int):
    """The three phases without autograd, one channel block at a time, in place: (1) every chunk's end
    state from a zero start; (2) the carry across chunks gives each chunk's true start state; (3) the
    recurrence runs again from the true starts and reads y out. Recomputing the decays in (3) is cheaper
    than storing them (fewer bytes moved). Returns y, the final state and the chunk start states.
    """
    batch, length, d_inner = dt.shape
    n, n_chunks = A.shape[1], length // q
    B_c = B.view(batch, n_chunks, q, n)
    C_c = C.view(batch, n_chunks, q, n)
    y = dt.new_empty(batch, n_chunks, q, d_inner)
    final = dt.new_empty(batch, d_inner, n)
    all_starts = dt.new_empty(batch, n_chunks, d_inner, n)
    block = max(8, min(d_inner, _INPLACE_BLOCK_ELEMS // max(1, batch * n_chunks * n)))
    for c0 in range(0, d_inner, block):
        c1 = min(d_inner, c0 + block)
        width = c1 - c0
        A_b = A[c0:c1]
        dt_b = dt[..., c0:c1].reshape(batch, n_chunks, q, width)
        du_b = du[..., c0:c1].reshape(batch, n_chunks, q, width)
        h = dt.new_zeros(batch, n_chunks, width, n)
        a = torch.empty_like(h)
        for j in range(q):
            torch.mul(dt_b[:, :, j, :, None], A_b, out=a).exp_()
            h.mul_(a).addcmul_(du_b[:, :, j, :, None], B_c[:, :, j, None, :])
        chunk_decay = torch.exp(dt_b.sum(dim=2)[..., None] * A_b)
        state = state0[:, c0:c1].clone()
        starts = torch.empty_like(h)
        for k in range(n_chunks):
            starts[:, k] = state
            state.mul_(chunk_decay[:, k]).add_(h[:, k])
        final[:, c0:c1] = state
        all_starts[:, :, c0:c1] = starts
        h.copy_(starts)
        y_b = dt.new_empty(batch, n_chunks, q, width)
        hc = torch.empty_like(h)
        for j in range(q):
            torch.mul(dt_b[:, :, j, :, None], A_b, out=a).exp_()
            h.mul_(a).addcmul_(du_b[:, :, j, :, None], B_c[:, :, j, None, :])
            torch.sum(torch.mul(h, C_c[:, :, j, None, :], out=hc), dim=-1, out=y_b[:, :, j])
        y[..., c0:c1] = y_b
    return y.view(batch, length, d_inner), final, all_starts


class _ChunkedScan(torch.autograd.Function):
    """y_t = sum_n C_t h_t and the final state, for h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, h_{-1} = h0.

    Forward is the in-place chunked scan, saving only the inputs and the chunk start states. Backward
    recomputes the states chunk-parallel and runs the adjoint recurrence backwards with the same three
    phases: lam_t = C_t gy_t + exp(dt_{t+1} A) lam_{t+1} (lam_{L-1} also gets the final-state gradient);
    then with g_a = lam_t * h_{t-1} * a_t: d dt_t = sum_n g_a A + (sum_n lam_t B_t) u_t,
    dA = sum_t g_a dt_t, du_t = (sum_n lam_t B_t) dt_t, dB_t = sum_c lam_t dt_t u_t, dC_t = sum_c gy_t h_t,
    dh0 = a_0 lam_0. Inputs are fp32, L a multiple of the chunk length q.
    """

    @staticmethod
    def forward(ctx, dt, u, A, B, C, h0, q):
        y, final, starts = _chunk_scan_inplace(dt, dt * u, B, C, A, h0, q)
        ctx.save_for_backward(dt, u, A, B, C, starts)
        ctx.q = q
        return y, final

    @staticmethod
    def backward(ctx, gy, g_final):
        dt, u, A, B, C, starts = ctx.saved_tensors
        q = ctx.q
        batch, length, d_inner = dt.shape
        n, n_chunks = A.shape[1], length // q
        dt_c = dt.view(batch, n_chunks, q, d_inner)
        u_c = u.view(batch, n_chunks, q, d_inner)
        du_c = dt_c * u_c
        B_c, C_c = B.view(batch, n_chunks, q, n), C.view(batch, n_chunks, q, n)
        gy_c = torch.zeros_like(dt_c) if gy is None else gy.float().reshape(batch, n_chunks, q, d_inner)

        def decay(j: int) -> Tensor:
            return torch.exp(dt_c[:, :, j, :, None] * A)

        # Adjoints inside each chunk, starting from zero at the chunk end.
        lams = dt.new_empty(batch, n_chunks, q, d_inner, n)
        lam = torch.zeros_like(starts)
        for j in reversed(range(q)):
            if j < q - 1:
                lam.mul_(decay(j + 1))
            lam.add_(gy_c[:, :, j, :, None] * C_c[:, :, j, None, :])
            lams[:, :, j] = lam
        # Carry adjoints from the right: incoming[k] is the adjoint entering chunk k at its end.
        cum_dt = dt_c.cumsum(dim=2)
        to_end = cum_dt[:, :, -1:, :] - cum_dt  # sum of dt over positions t+1..end of the chunk
        incoming = torch.empty_like(starts)
        r = torch.zeros_like(starts) if g_final is None else g_final.float().clone()
        for k in reversed(range(n_chunks)):
            incoming[:, k] = r
            lam_first = lams[:, k, 0] + torch.exp(to_end[:, k, 0, :, None] * A) * r
            r = torch.exp(dt_c[:, k, 0, :, None] * A) * lam_first
        g_h0 = r
        # Recompute the states from the chunk starts, position by position (all chunks at once), and
        # accumulate the gradients as we go; small contractions as multiply + sum (batched tiny matmuls
        # are far slower on CPU).
        g_dt = torch.empty_like(dt_c)
        g_du = torch.empty_like(dt_c)
        g_B = torch.empty_like(B_c)
        g_C = torch.empty_like(C_c)
        g_A = torch.zeros_like(A)
        h = starts.clone()
        g_a = torch.empty_like(h)
        for j in range(q):
            lam = lams[:, :, j]
            lam.add_(torch.exp(to_end[:, :, j, :, None] * A).mul_(incoming))
            a = decay(j)
            torch.mul(lam, h, out=g_a).mul_(a)  # uses h_{t-1}
            h.mul_(a).add_(du_c[:, :, j, :, None] * B_c[:, :, j, None, :])  # now h_t
            g_dt[:, :, j] = (g_a * A).sum(-1)
            g_A += (g_a * dt_c[:, :, j, :, None]).sum((0, 1))
            g_du[:, :, j] = (lam * B_c[:, :, j, None, :]).sum(-1)
            g_B[:, :, j] = (lam * du_c[:, :, j, :, None]).sum(2)
            g_C[:, :, j] = (h * gy_c[:, :, j, :, None]).sum(2)
        g_dt += g_du * u_c
        g_u = g_du * dt_c
        shape = (batch, length)
        return (
            g_dt.view(*shape, d_inner),
            g_u.view(*shape, d_inner),
            g_A,
            g_B.view(*shape, n),
            g_C.view(*shape, n),
            g_h0,
            None,
        )


# ---------------------------------------------------------------------------------------------------------
# Triton kernels. One program (one warp by default) owns (batch row b, BLOCK_D channels); each thread holds
# one channel's N states and walks the sequence, T_SUB positions per loop step: the step's inputs are
# loaded as (BLOCK_D, T_SUB) tiles first and y is stored once at the end, so the loads of a step are in
# flight together. With few programs the forward also splits the sequence into segments: a pass from zero
# states gives each segment's end state and sum of dt, a carry over the segments gives their true start
# states, and the real pass runs from those. The forward keeps the state at every CHUNK-th position
# (B, n_chunks, D_in, N fp32) for
# the backward, which recomputes each chunk forward from it, keeping every 4th state in a small scratch
# buffer (L2-resident), then walks the chunk backwards 4 positions at a time with those positions' states
# and decays in registers, running the adjoint recurrence lambda_t = C_t g_t + decay_{t+1} lambda_{t+1}.
# ---------------------------------------------------------------------------------------------------------

if triton is not None:
    from .tl_math import softplus as _softplus

    @triton.jit
    def _seq_inputs(
        u_ptr, delta_ptr, B_ptr, C_ptr, bias, t, L, offs_d, mask_d, offs_n, mask_n,
        s_ul, s_dl, s_Bl, s_Cl, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):  # fmt: skip
        valid = t < L
        m = mask_d & valid
        u = tl.load(u_ptr + t * s_ul + offs_d, mask=m, other=0.0).to(tl.float32)
        raw = tl.load(delta_ptr + t * s_dl + offs_d, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += bias
        dt = _softplus(raw) if SOFTPLUS else raw
        dt = tl.where(m, dt, 0.0)  # past the end: decay 1 and no input
        b_t = tl.load(B_ptr + t * s_Bl + offs_n, mask=mask_n & valid, other=0.0).to(tl.float32)
        c_t = tl.load(C_ptr + t * s_Cl + offs_n, mask=mask_n & valid, other=0.0).to(tl.float32)
        return u, raw, dt, b_t, c_t

    @triton.jit
    def _scan_fwd_seq_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        y_ptr, hT_ptr, ckpt_ptr, dtsum_ptr,
        L, D_IN, SEG,
        s_ub, s_ul, s_db, s_dl, s_Bb, s_Bl, s_Cb, s_Cl, s_zb, s_zl,
        N: tl.constexpr, N_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, T_SUB: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
        SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr, STORE_Y: tl.constexpr, BC_TILES: tl.constexpr,
    ):  # fmt: skip
        # Program (b, channel block, g) runs positions [g * SEG, (g + 1) * SEG) from the start state
        # h0[b, g] (zero without HAS_H0) and leaves its end state in hT[b, g]. Without STORE_Y it only
        # sums dt per channel (the segment's total decay is exp(A * sum dt)) for the carry across segments.
        b = tl.program_id(0)
        g = tl.program_id(2)
        n_seg = tl.num_programs(2)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
        mask_d = offs_d < D_IN
        offs_n = tl.arange(0, N_P2)[None, :]
        mask_n = offs_n < N
        state_mask = mask_d & mask_n
        state_offs = offs_d * N + offs_n
        A2 = tl.load(A_ptr + state_offs, mask=state_mask, other=0.0) * 1.4426950408889634
        seg_state = (b * n_seg + g) * D_IN * N + state_offs
        if HAS_H0:
            h = tl.load(h0_ptr + seg_state, mask=state_mask, other=0.0)
        else:
            h = tl.zeros((BLOCK_D, N_P2), tl.float32)
        dt_sum = tl.zeros((BLOCK_D, 1), tl.float32)
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
        u_ptr += b * s_ub
        delta_ptr += b * s_db
        B_ptr += b * s_Bb
        C_ptr += b * s_Cb
        z_ptr += b * s_zb
        y_ptr += b * L * D_IN
        n_chunks = (L + CHUNK - 1) // CHUNK
        cols = tl.arange(0, T_SUB)[None, :]
        rows = tl.arange(0, T_SUB)[:, None]
        for t0 in range(g * SEG, tl.minimum((g + 1) * SEG, L), T_SUB):
            if SAVE_CKPT:
                if t0 % CHUNK == 0:
                    tl.store(ckpt_ptr + (b * n_chunks + t0 // CHUNK) * D_IN * N + state_offs, h, mask=state_mask)
            # All loads of the group first, as (BLOCK_D, T_SUB) tiles, and one store of y at the end: a store
            # between two steps would keep the next step's loads from being issued early (possible aliasing).
            t_cols = t0 + cols
            m = mask_d & (t_cols < L)
            u_tile = tl.load(u_ptr + t_cols * s_ul + offs_d, mask=m, other=0.0).to(tl.float32)
            raw_tile = tl.load(delta_ptr + t_cols * s_dl + offs_d, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                raw_tile += bias
            dt_tile = tl.where(m, _softplus(raw_tile) if SOFTPLUS else raw_tile, 0.0)
            if not STORE_Y:
                dt_sum += tl.sum(dt_tile, 1, keep_dims=True)
            if BC_TILES:
                # B and C of the group as (T_SUB, N) tiles as well, each step's row picked in registers: all
                # global loads of the group are then issued first (the picks cost shared-memory round trips).
                t_rows = t0 + rows
                m_bc = (t_rows < L) & mask_n
                B_tile = tl.load(B_ptr + t_rows * s_Bl + offs_n, mask=m_bc, other=0.0).to(tl.float32)
                C_tile = tl.load(C_ptr + t_rows * s_Cl + offs_n, mask=m_bc, other=0.0).to(tl.float32)
            y_tile = tl.zeros((BLOCK_D, T_SUB), tl.float32)
            for j in tl.static_range(T_SUB):
                t = t0 + j
                u = tl.sum(tl.where(cols == j, u_tile, 0.0), 1, keep_dims=True)
                dt = tl.sum(tl.where(cols == j, dt_tile, 0.0), 1, keep_dims=True)
                if BC_TILES:
                    b_t = tl.sum(tl.where(rows == j, B_tile, 0.0), 0, keep_dims=True)
                    c_t = tl.sum(tl.where(rows == j, C_tile, 0.0), 0, keep_dims=True)
                else:
                    b_t = tl.load(B_ptr + t * s_Bl + offs_n, mask=mask_n & (t < L), other=0.0).to(tl.float32)
                    c_t = tl.load(C_ptr + t * s_Cl + offs_n, mask=mask_n & (t < L), other=0.0).to(tl.float32)
                h = tl.exp2(dt * A2) * h + (dt * u) * b_t
                if STORE_Y:
                    y_tile = tl.where(cols == j, tl.sum(h * c_t, 1, keep_dims=True), y_tile)
            if STORE_Y:
                if HAS_D:
                    y_tile += d_skip * u_tile
                if HAS_Z:
                    zv = tl.load(z_ptr + t_cols * s_zl + offs_d, mask=m, other=0.0).to(tl.float32)
                    y_tile = y_tile * zv * tl.sigmoid(zv)
                tl.store(y_ptr + t_cols * D_IN + offs_d, y_tile.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(hT_ptr + seg_state, h, mask=state_mask)
        if not STORE_Y:
            tl.store(dtsum_ptr + (b * n_seg + g) * D_IN + offs_d, dt_sum, mask=mask_d)

    @triton.jit
    def _seq_g(dy_ptr, z_ptr, t, L, offs_d, mask_d, s_yl, s_zl, HAS_Z: tl.constexpr):
        """dy at position t and g = dy * silu(z), the gradient of the output before the gate."""
        m = mask_d & (t < L)
        dy = tl.load(dy_ptr + t * s_yl + offs_d, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + t * s_zl + offs_d, mask=m, other=0.0).to(tl.float32)
            return dy * zv * tl.sigmoid(zv), dy, zv
        return dy, dy, dy

    @triton.jit
    def _seq_grads(
        lam, h, h_prev, decay, u, raw, dt, b_t, c_t, g, dy, zv, t, L, A, d_skip, dA_acc,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, offs_d, mask_d, offs_n, mask_n,
        D_IN, N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):  # fmt: skip
        """Position t of the backward; lam is the gradient reaching h_t from every later position."""
        valid = t < L
        m = mask_d & valid
        if HAS_Z:
            y_core = tl.sum(h * c_t, 1, keep_dims=True)
            if HAS_D:
                y_core += d_skip * u
            sig = tl.sigmoid(zv)
            dz = dy * y_core * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + t * D_IN + offs_d, dz.to(dz_ptr.dtype.element_ty), mask=m)
        tl.store(dC_ptr + t * N + offs_n, tl.sum(h * g, 0, keep_dims=True), mask=mask_n & valid)
        lam_b = lam * b_t
        du = tl.sum(lam_b, 1, keep_dims=True)
        g_decay = lam * h_prev * decay  # d(decay_t) * decay_t
        ddt = du * u + tl.sum(g_decay * A, 1, keep_dims=True)
        tl.store(dB_ptr + t * N + offs_n, tl.sum(lam * (dt * u), 0, keep_dims=True), mask=mask_n & valid)
        du = du * dt
        if HAS_D:
            du += d_skip * g
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m, ddt, 0.0)
        tl.store(du_ptr + t * D_IN + offs_d, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddelta_ptr + t * D_IN + offs_d, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
        dA_acc += g_decay * dt
        return ddt, dA_acc

    @triton.jit
    def _scan_bwd_seq_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dy_ptr, dhT_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        L, D_IN, BATCH,
        s_ub, s_ul, s_db, s_dl, s_Bb, s_Bl, s_Cb, s_Cl, s_zb, s_zl, s_yb, s_yl,
        N: tl.constexpr, N_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
        SOFTPLUS: tl.constexpr, scratch_ptr,
    ):  # fmt: skip
        # T_SUB is 4 here: the four positions' states and decays are named registers.
        b = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
        mask_d = offs_d < D_IN
        offs_n = tl.arange(0, N_P2)[None, :]
        mask_n = offs_n < N
        state_mask = mask_d & mask_n
        state_offs = offs_d * N + offs_n
        A = tl.load(A_ptr + state_offs, mask=state_mask, other=0.0)
        A2 = A * 1.4426950408889634
        if HAS_DHT:
            lam = tl.load(dhT_ptr + b * D_IN * N + state_offs, mask=state_mask, other=0.0)
        else:
            lam = tl.zeros((BLOCK_D, N_P2), tl.float32)
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
        dA_acc = tl.zeros((BLOCK_D, N_P2), tl.float32)
        dD_acc = tl.zeros((BLOCK_D, 1), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D, 1), tl.float32)
        decay_next = tl.full((BLOCK_D, N_P2), 1.0, tl.float32)  # after the last position: lambda_L = dhT
        u_ptr += b * s_ub
        delta_ptr += b * s_db
        B_ptr += b * s_Bb
        C_ptr += b * s_Cb
        z_ptr += b * s_zb
        dy_ptr += b * s_yb
        du_ptr += b * L * D_IN
        ddelta_ptr += b * L * D_IN
        dz_ptr += b * L * D_IN
        dB_ptr += (pid_d * BATCH + b) * L * N
        dC_ptr += (pid_d * BATCH + b) * L * N
        scratch_ptr += (b * tl.num_programs(1) + pid_d) * (CHUNK // 4) * BLOCK_D * N_P2
        local = tl.arange(0, BLOCK_D)[:, None] * N_P2 + offs_n
        n_chunks = (L + CHUNK - 1) // CHUNK
        for kk in range(n_chunks):
            k = n_chunks - 1 - kk
            # Forward through the chunk from its saved start, keeping every 4th state.
            h = tl.load(ckpt_ptr + (b * n_chunks + k) * D_IN * N + state_offs, mask=state_mask, other=0.0)
            for s in range(CHUNK // 4):
                tl.store(scratch_ptr + s * BLOCK_D * N_P2 + local, h)
                for j in tl.static_range(4):
                    t = k * CHUNK + s * 4 + j
                    u, raw, dt, b_t, c_t = _seq_inputs(
                        u_ptr, delta_ptr, B_ptr, C_ptr, bias, t, L, offs_d, mask_d, offs_n, mask_n,
                        s_ul, s_dl, s_Bl, s_Cl, HAS_BIAS, SOFTPLUS,
                    )  # fmt: skip
                    h = tl.exp2(dt * A2) * h + (dt * u) * b_t
            tl.debug_barrier()
            # Backwards, four positions at a time.
            for ss in range(CHUNK // 4):
                s = CHUNK // 4 - 1 - ss
                t0 = k * CHUNK + s * 4
                h_start = tl.load(scratch_ptr + s * BLOCK_D * N_P2 + local)
                u0, raw0, dt0, b0, c0 = _seq_inputs(
                    u_ptr,
                    delta_ptr,
                    B_ptr,
                    C_ptr,
                    bias,
                    t0,
                    L,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    s_ul,
                    s_dl,
                    s_Bl,
                    s_Cl,
                    HAS_BIAS,
                    SOFTPLUS,
                )
                u1, raw1, dt1, b1, c1 = _seq_inputs(
                    u_ptr,
                    delta_ptr,
                    B_ptr,
                    C_ptr,
                    bias,
                    t0 + 1,
                    L,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    s_ul,
                    s_dl,
                    s_Bl,
                    s_Cl,
                    HAS_BIAS,
                    SOFTPLUS,
                )
                u2, raw2, dt2, b2, c2 = _seq_inputs(
                    u_ptr,
                    delta_ptr,
                    B_ptr,
                    C_ptr,
                    bias,
                    t0 + 2,
                    L,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    s_ul,
                    s_dl,
                    s_Bl,
                    s_Cl,
                    HAS_BIAS,
                    SOFTPLUS,
                )
                u3, raw3, dt3, b3, c3 = _seq_inputs(
                    u_ptr,
                    delta_ptr,
                    B_ptr,
                    C_ptr,
                    bias,
                    t0 + 3,
                    L,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    s_ul,
                    s_dl,
                    s_Bl,
                    s_Cl,
                    HAS_BIAS,
                    SOFTPLUS,
                )
                e0 = tl.exp2(dt0 * A2)
                e1 = tl.exp2(dt1 * A2)
                e2 = tl.exp2(dt2 * A2)
                e3 = tl.exp2(dt3 * A2)
                h0 = e0 * h_start + (dt0 * u0) * b0
                h1 = e1 * h0 + (dt1 * u1) * b1
                h2 = e2 * h1 + (dt2 * u2) * b2
                h3 = e3 * h2 + (dt3 * u3) * b3
                g0, dy0, z0 = _seq_g(dy_ptr, z_ptr, t0, L, offs_d, mask_d, s_yl, s_zl, HAS_Z)
                g1, dy1, z1 = _seq_g(dy_ptr, z_ptr, t0 + 1, L, offs_d, mask_d, s_yl, s_zl, HAS_Z)
                g2, dy2, z2 = _seq_g(dy_ptr, z_ptr, t0 + 2, L, offs_d, mask_d, s_yl, s_zl, HAS_Z)
                g3, dy3, z3 = _seq_g(dy_ptr, z_ptr, t0 + 3, L, offs_d, mask_d, s_yl, s_zl, HAS_Z)
                # lambda_t = C_t g_t + decay_{t+1} lambda_{t+1}
                lam = decay_next * lam + g3 * c3
                ddt3, dA_acc = _seq_grads(
                    lam,
                    h3,
                    h2,
                    e3,
                    u3,
                    raw3,
                    dt3,
                    b3,
                    c3,
                    g3,
                    dy3,
                    z3,
                    t0 + 3,
                    L,
                    A,
                    d_skip,
                    dA_acc,
                    du_ptr,
                    ddelta_ptr,
                    dz_ptr,
                    dB_ptr,
                    dC_ptr,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    D_IN,
                    N,
                    HAS_D,
                    HAS_Z,
                    SOFTPLUS,
                )
                lam = e3 * lam + g2 * c2
                ddt2, dA_acc = _seq_grads(
                    lam,
                    h2,
                    h1,
                    e2,
                    u2,
                    raw2,
                    dt2,
                    b2,
                    c2,
                    g2,
                    dy2,
                    z2,
                    t0 + 2,
                    L,
                    A,
                    d_skip,
                    dA_acc,
                    du_ptr,
                    ddelta_ptr,
                    dz_ptr,
                    dB_ptr,
                    dC_ptr,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    D_IN,
                    N,
                    HAS_D,
                    HAS_Z,
                    SOFTPLUS,
                )
                lam = e2 * lam + g1 * c1
                ddt1, dA_acc = _seq_grads(
                    lam,
                    h1,
                    h0,
                    e1,
                    u1,
                    raw1,
                    dt1,
                    b1,
                    c1,
                    g1,
                    dy1,
                    z1,
                    t0 + 1,
                    L,
                    A,
                    d_skip,
                    dA_acc,
                    du_ptr,
                    ddelta_ptr,
                    dz_ptr,
                    dB_ptr,
                    dC_ptr,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    D_IN,
                    N,
                    HAS_D,
                    HAS_Z,
                    SOFTPLUS,
                )
                lam = e1 * lam + g0 * c0
                ddt0, dA_acc = _seq_grads(
                    lam,
                    h0,
                    h_start,
                    e0,
                    u0,
                    raw0,
                    dt0,
                    b0,
                    c0,
                    g0,
                    dy0,
                    z0,
                    t0,
                    L,
                    A,
                    d_skip,
                    dA_acc,
                    du_ptr,
                    ddelta_ptr,
                    dz_ptr,
                    dB_ptr,
                    dC_ptr,
                    offs_d,
                    mask_d,
                    offs_n,
                    mask_n,
                    D_IN,
                    N,
                    HAS_D,
                    HAS_Z,
                    SOFTPLUS,
                )
                decay_next = e0
                dD_acc += g0 * u0 + g1 * u1 + g2 * u2 + g3 * u3
                dbias_acc += ddt0 + ddt1 + ddt2 + ddt3
            tl.debug_barrier()
        tl.store(dh0_ptr + b * D_IN * N + state_offs, decay_next * lam, mask=state_mask)
        tl.store(dA_ptr + b * D_IN * N + state_offs, dA_acc, mask=state_mask)
        tl.store(dD_ptr + b * D_IN + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + b * D_IN + offs_d, dbias_acc, mask=mask_d)


# Positions between the states the forward keeps for the backward (a multiple of 4 and of SCAN_T_SUB);
# (BLOCK_D, num_warps) of the forward and of the backward; positions per forward loop step.
SCAN_CHUNK = 64
SCAN_FWD_CONFIG = (8, 1)
SCAN_BWD_CONFIG = (16, 1)
# Sequence segments of the forward ("auto": split until about SCAN_MIN_PROGRAMS programs run, segments of at
# least 8 chunks; or a number). H200, forward ms by segments (benchmarks/results/tune_scan.log):
# 1x2048: 1 0.72, 2 0.58, 4 0.34, 8 0.46; 8x2048: 1 0.87, 2 1.37, 4 1.26; 2x16384: 1 5.7, 4 2.9, 16 2.6.
SCAN_SEGMENTS: int | str = "auto"
SCAN_MIN_PROGRAMS = 3000
# Forward: load B and C per group as tiles (all loads first) instead of per step. Not measured yet (the
# compiled loop has its global loads first but adds shared-memory round trips), so off by default.
SCAN_BC_TILES = False
SCAN_T_SUB = 4  # 8x2048: T_SUB 4 0.82 ms, 8 1.01 ms, 16 1.59 ms (benchmarks/results/tune_scan.log)


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _segments(batch: int, length: int, d_in: int, block_d: int) -> int:
    """Sequence segments for the forward: enough programs to fill the GPU even at batch 1. Splitting costs
    a second pass over the sequence, so it stops once about SCAN_MIN_PROGRAMS programs exist."""
    if SCAN_SEGMENTS != "auto":
        return max(1, min(int(SCAN_SEGMENTS), triton.cdiv(length, SCAN_CHUNK)))
    programs = batch * triton.cdiv(d_in, block_d)
    segments = 1
    while programs * segments * 2 <= SCAN_MIN_PROGRAMS and length // (segments * 2) >= 8 * SCAN_CHUNK:
        segments *= 2
    return segments


def _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, save_ckpt):
    batch, length, d_in = u.shape
    n = A.shape[1]
    chunk, (block_d, warps) = SCAN_CHUNK, SCAN_FWD_CONFIG
    u, delta, B, C = (_rows_contiguous(t) for t in (u, delta, B, C))
    z = None if z is None else _rows_contiguous(z)
    A = A.float().contiguous()
    dev, f32 = u.device, torch.float32
    y = torch.empty(batch, length, d_in, device=dev, dtype=u.dtype)
    n_chunks = triton.cdiv(length, chunk)
    segments = _segments(batch, length, d_in, block_d)
    seg_len = triton.cdiv(n_chunks, segments) * chunk  # whole chunks, so the kept states line up
    segments = triton.cdiv(length, seg_len)
    hT = torch.empty(batch, segments, d_in, n, device=dev, dtype=f32)
    ckpt = torch.empty(batch, n_chunks, d_in, n, device=dev, dtype=f32) if save_ckpt else hT
    starts = None if h0 is None else h0.float().contiguous()[:, None]
    zz = u if z is None else z
    dtsum = hT
    if segments > 1:
        # Pass 1: every segment from a zero state gives its end state and sum of dt; then the true start of
        # each segment follows sequentially over the (few) segments.
        dtsum = torch.empty(batch, segments, d_in, 1, device=dev, dtype=f32)
        ends = torch.empty_like(hT)
        _launch_fwd(u, delta, A, B, C, D, zz, z, delta_bias, None, y, ends, ckpt, dtsum, seg_len, segments,
                    delta_softplus, False, False, block_d, warps)  # fmt: skip
        state = torch.zeros(batch, d_in, n, device=dev, dtype=f32) if h0 is None else h0.float()
        starts = torch.empty_like(hT)
        for g in range(segments):
            starts[:, g] = state
            state = torch.exp(dtsum[:, g] * A) * state + ends[:, g]
    _launch_fwd(u, delta, A, B, C, D, zz, z, delta_bias, starts, y, hT, ckpt, dtsum, seg_len, segments,
                delta_softplus, save_ckpt, True, block_d, warps)  # fmt: skip
    return y, hT[:, -1], (ckpt if save_ckpt else None)


def _launch_fwd(u, delta, A, B, C, D, zz, z, delta_bias, starts, y, hT, ckpt, dtsum, seg_len, segments,
                softplus, save_ckpt, store_y, block_d, warps):  # fmt: skip
    batch, length, d_in = u.shape
    n = A.shape[1]
    _scan_fwd_seq_kernel[(batch, triton.cdiv(d_in, block_d), segments)](
        u, delta, A, B, C, u if D is None else D.float().contiguous(), zz,
        u if delta_bias is None else delta_bias.float().contiguous(), hT if starts is None else starts,
        y, hT, ckpt, dtsum, length, d_in, seg_len,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
        C.stride(0), C.stride(1), zz.stride(0), zz.stride(1),
        N=n, N_P2=triton.next_power_of_2(n), CHUNK=SCAN_CHUNK, BLOCK_D=block_d,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=starts is not None,
        SOFTPLUS=softplus, SAVE_CKPT=save_ckpt, STORE_Y=store_y, T_SUB=SCAN_T_SUB, BC_TILES=SCAN_BC_TILES,
        num_warps=warps,
    )  # fmt: skip


def _scan_bwd_triton(dy, dhT, u, delta, A, B, C, D, z, delta_bias, delta_softplus, ckpt):
    batch, length, d_in = u.shape
    n = A.shape[1]
    chunk, (block_d, warps) = SCAN_CHUNK, SCAN_BWD_CONFIG
    if ckpt.shape[1] != triton.cdiv(length, chunk):
        raise RuntimeError("selective scan: the saved states do not match the chunk size (SCAN_CHUNK changed?)")
    dy = _rows_contiguous(dy)
    n_dblocks = triton.cdiv(d_in, block_d)
    dev, f32 = u.device, torch.float32
    du = torch.empty(batch, length, d_in, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, length, d_in, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, length, d_in, device=dev, dtype=z.dtype) if z is not None else du
    dB = torch.empty(n_dblocks, batch, length, n, device=dev, dtype=f32)
    dC = torch.empty(n_dblocks, batch, length, n, device=dev, dtype=f32)
    dA = torch.empty(batch, d_in, n, device=dev, dtype=f32)
    dD = torch.empty(batch, d_in, device=dev, dtype=f32)
    dbias = torch.empty(batch, d_in, device=dev, dtype=f32)
    dh0 = torch.empty(batch, d_in, n, device=dev, dtype=f32)
    zz = u if z is None else z
    n_p2 = triton.next_power_of_2(n)
    scratch = torch.empty(batch * n_dblocks * (chunk // 4) * block_d * n_p2, device=dev, dtype=f32)
    _scan_bwd_seq_kernel[(batch, n_dblocks)](
        u, delta, A, B, C, u if D is None else D.float().contiguous(), zz,
        u if delta_bias is None else delta_bias.float().contiguous(), ckpt, dy,
        dh0 if dhT is None else dhT.float().contiguous(),
        du, ddelta, dz, dB, dC, dA, dD, dbias, dh0, length, d_in, batch,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
        C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), dy.stride(0), dy.stride(1),
        N=n, N_P2=triton.next_power_of_2(n), CHUNK=chunk, BLOCK_D=block_d,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DHT=dhT is not None,
        SOFTPLUS=delta_softplus, scratch_ptr=scratch, num_warps=warps,
    )  # fmt: skip
    return du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0), (None if z is None else dz), dbias.sum(0), dh0


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
        u, delta, B, C = (_rows_contiguous(t) for t in (u, delta, B, C))
        y, hT, ckpt = _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, save_ckpt=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus = delta_softplus
        ctx.has_h0 = h0 is not None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_bwd_triton(
            dy, dhT, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ckpt
        )
        return (
            du,
            ddelta,
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            None if D is None else dD.to(D.dtype),
            dz,
            None if delta_bias is None else dbias.to(delta_bias.dtype),
            dh0 if ctx.has_h0 else None,
            None,
        )


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The fused Triton scan (forward and backward); same arguments and results as :func:`selective_scan_ref`."""
    if triton is None:
        raise RuntimeError("selective_scan_triton needs the triton package")
    _check_inputs(u, delta, A, B, C, initial_state)
    if u.shape[1] == 0:
        return selective_scan_ref(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
        )
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, hT = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    else:
        y, hT, _ = _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, False)
    return (y, hT) if return_final_state else y


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan on the selected backend; see :func:`selective_scan_ref` for shapes."""
    backend = resolve_backend(u, has_triton=True)
    impl = {"ref": selective_scan_ref, "triton": selective_scan_triton}.get(backend, selective_scan_chunked)
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)


def selective_state_update(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
) -> Tensor:
    """One decode step, updating ``state`` (B, D_in, N) fp32 in place.

    u, delta, z: (B, D_in); B, C: (B, N). Returns y (B, D_in) in u's dtype. It is the recurrence's
    single step, so it equals :func:`selective_scan_ref` run one token at a time.
    """
    if state.dtype != torch.float32:
        raise ValueError(f"selective_state_update: the SSM state must be float32, got {state.dtype}")
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    decay = torch.exp(dt[:, :, None] * A.float())
    state.mul_(decay).add_((dt * u.float())[:, :, None] * B.float()[:, None, :])
    y = torch.einsum("bcn,bn->bc", state, C.float())
    return _finish(y, u, D, z)
