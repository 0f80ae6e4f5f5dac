"""Mamba's selective scan (the S6 recurrence, Gu & Dao 2023, Algorithm 2), in (B, L, D_in) layout: the
reference, its one-step form for decoding, and the dispatchers.

For every channel c and state n, with h_{-1} = initial_state (zero by default):

    dt_t    = softplus(delta_t + delta_bias)                 (when delta_softplus)
    h_t     = exp(dt_t[c] * A[c, n]) * h_{t-1} + dt_t[c] * B_t[n] * u_t[c]
    y_t[c]  = sum_n h_t[c, n] * C_t[n] + D[c] * u_t[c]
    y_t     = y_t * silu(z_t)                                 (when z is given)

Numerics: the state, dt, A, D and the accumulation stay in fp32 whatever the input dtype; ``y`` is
returned in ``u``'s dtype and the final state in fp32.

* :func:`selective_scan_ref` is the sequential definition; :func:`selective_scan` runs it, the PyTorch
  chunked path (:mod:`.scan_chunked`) or the Triton kernels (:mod:`.scan_triton`), as the backend says.
* :func:`selective_state_update` is one step of the recurrence on a decode state, in place; :func:`ssm_update`
  runs it or its Triton kernel (:func:`.scan_triton.ssm_update_triton`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend


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
    """The selective scan on the selected backend; see :func:`selective_scan_ref` for shapes. The "torch" backend
    runs the compiled CPU scan (:mod:`.scan_cpu`) where it applies, else the PyTorch chunked path."""
    backend = resolve_backend(u, has_triton=True)
    impls = {"ref": selective_scan_ref, "triton": scan_triton.selective_scan_triton}
    impl = impls.get(backend, scan_chunked.selective_scan_chunked)
    if backend == "torch" and scan_cpu.applies(u, delta, A, B, C, D, z, delta_bias, initial_state):
        impl = scan_cpu.selective_scan_cpu
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
    dt_weight: Tensor | None = None,
    a_from_log: bool = False,
    state_indices: Tensor | None = None,
) -> Tensor:
    """One decode step, updating ``state`` (S, D_in, N) fp32 in place; it equals :func:`selective_scan_ref` run
    one token at a time.

    u, z: (B, D_in); delta: (B, D_in), or (B, R) with ``dt_weight`` (D_in, R), then dt = delta @ dt_weight^T
    (in delta's dtype); B, C: (B, N); D, delta_bias: (D_in,). With ``a_from_log`` the ``A`` argument holds
    A_log and A = -exp(A_log). Row b of the inputs steps state row ``state_indices[b]`` (rows 0..B-1 without
    indices; S = B then). Returns y (B, D_in) in u's dtype.
    """
    if state.dtype != torch.float32:
        raise ValueError(f"selective_state_update: the SSM state must be float32, got {state.dtype}")
    if dt_weight is not None:
        delta = F.linear(delta, dt_weight)
    if a_from_log:
        A = -torch.exp(A.float())
    rows = state if state_indices is None else state.index_select(0, state_indices)
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    decay = torch.exp(dt[:, :, None] * A.float())
    rows.mul_(decay).add_((dt * u.float())[:, :, None] * B.float()[:, None, :])
    y = torch.einsum("bcn,bn->bc", rows, C.float())
    if state_indices is not None:
        state.index_copy_(0, state_indices, rows)
    return _finish(y, u, D, z)


def ssm_update(
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
    dt_weight: Tensor | None = None,
    a_from_log: bool = False,
    state_indices: Tensor | None = None,
) -> Tensor:
    """One SSM decode step on the selected backend; see :func:`selective_state_update`. The Triton kernel
    keeps the fused dt (``dt_weight``) in fp32, so in bf16 it differs from the reference by about one bf16
    rounding of dt."""
    args = (state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    options = dict(dt_weight=dt_weight, a_from_log=a_from_log, state_indices=state_indices)
    if resolve_backend(u, has_triton=True) == "triton":
        return scan_triton.ssm_update_triton(*args, **options)
    return selective_state_update(*args, **options)


# The implementations import the checks and the reference above, so they come last.
from . import scan_chunked, scan_cpu, scan_triton  # noqa: E402
