"""The selective scan's fast PyTorch path (CPU, and any device without Triton); same arguments and results
as :func:`.scan.selective_scan_ref`.

The sequence is cut into chunks of length Q; (1) a scan from a zero state runs in all chunks at once
(Q vectorised steps) and gives each chunk's local end state, (2) the chunk start states are carried
across chunks (L/Q steps), (3) the recurrence runs again inside every chunk from its true start state and
reads y out. That is about 2*sqrt(L) + Q Python steps instead of L; every exponent, dt * A, is <= 0, so
nothing overflows. Without autograd it works in place on channel blocks; with autograd a custom
backward runs the adjoint recurrence backwards with the same chunking (see ``_ChunkedScan``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import _check_inputs, _finish, _prepare_dt
from .settings import get_settings


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
    # Channels per block: small enough that one step's (B, n_chunks, block, N) buffers stay in a core's cache,
    # large enough that Python overhead per op stays small.
    block = max(8, min(d_inner, get_settings().inplace_block_elems // max(1, batch * n_chunks * n)))
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
