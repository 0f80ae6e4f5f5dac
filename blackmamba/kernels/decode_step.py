"""Mamba's decode step (one token per sequence) as two Triton kernels around the matmuls.

    [x ; z] = W_in u;  x = silu(conv_update(x, conv_state));  [dt_low ; B ; C] = W_x x
    y = ssm_update(ssm_state, x, dt_low, A, B, C, D, z, dt_bias, dt_weight=W_dt);  out = W_out y

``conv_update_triton`` shifts the conv window (B, K-1, D_in) by one in place and returns the activated
conv output; ``ssm_update_triton`` advances the SSM state (B, D_in, N) by one step in place and returns y.
It can fold the dt_proj GEMV (dt = W_dt dt_low) in, so that needs no launch of its own. Both kernels are
memory bound: the floor is one read and one write of each state. The references are
:func:`causal_conv1d_update` and :func:`selective_state_update`; :func:`mamba_decode_step` picks the
kernels or the references through :func:`resolve_backend`.

Numerics: all arithmetic is fp32; the SSM state stays fp32; the conv window keeps its own dtype (the new
input is rounded to it before the conv, as in the reference); outputs take x's dtype. The fused dt stays
fp32, where a separate dt_proj would round it to the model dtype, so bf16 results differ from the unfused
path by about one bf16 rounding of dt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend
from .causal_conv1d import causal_conv1d_update
from .selective_scan import selective_state_update
from .tl_math import softplus

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched, the references run

    def _jit(fn):
        return fn


# Launch shape: at least this many programs (about one per SM of an H100/H200) so that batch 1 still
# spreads over the GPU; tiles of at most _MAX_TILE elements so registers stay small for any N.
_MIN_PROGRAMS = 128
_MAX_TILE = 4096
_BLOCK_R = 64


def _launch_config(batch: int, dim: int, row: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for tiles of BLOCK_D rows of ``row`` elements over ``dim`` channels."""
    block = min(128, triton.next_power_of_2(dim), max(1, _MAX_TILE // row))
    while block > 16 and batch * triton.cdiv(dim, block) < _MIN_PROGRAMS:
        block //= 2
    return block, max(1, min(8, block * row // 512))


@_jit
def _conv_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    dim,
    stride_x_b,
    stride_x_d,
    stride_s_b,
    stride_s_k,
    stride_s_d,
    stride_w_d,
    stride_w_k,
    stride_y_b,
    stride_y_d,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < dim
    state = state_ptr + b * stride_s_b + d * stride_s_d
    w = w_ptr + d * stride_w_d
    # The new input enters the window in the window's dtype, as in the reference.
    x_new = tl.load(x_ptr + b * stride_x_b + d * stride_x_d, mask=mask, other=0.0).to(state_ptr.dtype.element_ty)
    acc = tl.load(w + (K - 1) * stride_w_k, mask=mask, other=0.0).to(tl.float32) * x_new.to(tl.float32)
    for k in tl.static_range(K - 1):
        s = tl.load(state + k * stride_s_k, mask=mask, other=0.0)
        acc += tl.load(w + k * stride_w_k, mask=mask, other=0.0).to(tl.float32) * s.to(tl.float32)
        if k > 0:  # slot k-1 was read in the previous iteration, so it can take slot k's value now
            tl.store(state + (k - 1) * stride_s_k, s, mask=mask)
    if K > 1:
        tl.store(state + (K - 2) * stride_s_k, x_new, mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * stride_y_b + d * stride_y_d, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _expect(op: str, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must be {shape}, got {tuple(t.shape)}")


def conv_update_triton(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    out: Tensor | None = None,
) -> Tensor:
    """One conv decode step; same semantics as :func:`causal_conv1d_update`.

    x: (B, D) the new input (any strides); state: (B, K-1, D) the previous inputs, shifted in place;
    weight: (D, K); bias: (D,). Returns act(conv) (B, D) in x's dtype, written to ``out`` when given.
    """
    op = "conv_update_triton"
    if x.ndim != 2 or weight.ndim != 2:
        raise ValueError(f"{op}: x must be (B, D) and weight (D, K); got {tuple(x.shape)}, {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"{op}: unknown activation {activation!r}")
    batch, dim = x.shape
    width = weight.shape[1]
    _expect(op, "weight", weight, (dim, width))
    _expect(op, "state", state, (batch, width - 1, dim))
    if bias is not None:
        _expect(op, "bias", bias, (dim,))
        bias = bias.contiguous()
    out = torch.empty(batch, dim, dtype=x.dtype, device=x.device) if out is None else out
    _expect(op, "out", out, (batch, dim))
    if batch == 0 or dim == 0:
        return out
    block, warps = _launch_config(batch, dim, 1)
    _conv_update_kernel[(batch, triton.cdiv(dim, block))](
        x,
        state,
        weight,
        x if bias is None else bias,
        out,
        dim,
        *x.stride(),
        *state.stride(),
        *weight.stride(),
        *out.stride(),
        K=width,
        HAS_BIAS=bias is not None,
        SILU=activation == "silu",
        BLOCK_D=block,
        num_warps=warps,
    )
    return out


@_jit
def _ssm_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    dtw_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    dt_bias_ptr,
    y_ptr,
    dim,
    dstate,
    rank,
    stride_h_b,
    stride_h_d,
    stride_h_n,
    stride_x_b,
    stride_x_d,
    stride_dt_b,
    stride_dt_k,
    stride_w_d,
    stride_w_r,
    stride_A_d,
    stride_A_n,
    stride_B_b,
    stride_B_n,
    stride_C_b,
    stride_C_n,
    stride_z_b,
    stride_z_d,
    stride_y_b,
    stride_y_d,
    FUSED_DT: tl.constexpr,
    A_FROM_LOG: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d = d < dim
    mask_n = n < dstate
    mask = mask_d[:, None] & mask_n[None, :]

    x = tl.load(x_ptr + b * stride_x_b + d * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)
    if FUSED_DT:  # dt = W_dt dt_low: the dt_proj GEMV for this block of channels
        dt = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask_r = r < rank
            low = tl.load(dt_ptr + b * stride_dt_b + r * stride_dt_k, mask=mask_r, other=0.0).to(tl.float32)
            w_tile = tl.load(
                dtw_ptr + d[:, None] * stride_w_d + r[None, :] * stride_w_r,
                mask=mask_d[:, None] & mask_r[None, :],
                other=0.0,
            ).to(tl.float32)
            dt += tl.sum(w_tile * low[None, :], axis=1)
    else:
        dt = tl.load(dt_ptr + b * stride_dt_b + d * stride_dt_k, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)

    A = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n, mask=mask, other=0.0).to(tl.float32)
    if A_FROM_LOG:  # A = -exp(A_log), which would otherwise take two launches per step
        A = -tl.exp(A)
    B = tl.load(B_ptr + b * stride_B_b + n * stride_B_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b * stride_C_b + n * stride_C_n, mask=mask_n, other=0.0).to(tl.float32)
    h_ptrs = state_ptr + b * stride_h_b + d[:, None] * stride_h_d + n[None, :] * stride_h_n
    h = tl.load(h_ptrs, mask=mask, other=0.0)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
    tl.store(h_ptrs, h, mask=mask)

    y = tl.sum(h * C[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * stride_z_b + d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * stride_y_b + d * stride_y_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def ssm_update_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    dt_weight: Tensor | None = None,
    out: Tensor | None = None,
    a_from_log: bool = False,
) -> Tensor:
    """One SSM decode step; same semantics as :func:`selective_state_update`, updating ``state`` in place.

    state: (B, D_in, N) fp32; x, z: (B, D_in); dt: (B, D_in), or (B, R) with ``dt_weight`` (D_in, R), in
    which case dt = dt @ dt_weight^T is computed inside the kernel; A: (D_in, N); B, C: (B, N);
    D, delta_bias: (D_in,). Inputs may be strided views. Returns y (B, D_in) in x's dtype (or ``out``).
    With ``a_from_log`` the ``A`` argument holds the parameter A_log and the kernel uses -exp(A_log).
    """
    op = "ssm_update_triton"
    if state.ndim != 3 or state.dtype != torch.float32:
        raise ValueError(f"{op}: state must be (B, D_in, N) float32, got {tuple(state.shape)} {state.dtype}")
    batch, dim, dstate = state.shape
    _expect(op, "x", x, (batch, dim))
    _expect(op, "A", A, (dim, dstate))
    _expect(op, "B", B, (batch, dstate))
    _expect(op, "C", C, (batch, dstate))
    rank = 0
    if dt_weight is not None:
        if dt_weight.ndim != 2 or dt_weight.shape[0] != dim:
            raise ValueError(f"{op}: dt_weight must be (D_in={dim}, R), got {tuple(dt_weight.shape)}")
        rank = dt_weight.shape[1]
    _expect(op, "dt", dt, (batch, rank) if dt_weight is not None else (batch, dim))
    if z is not None:
        _expect(op, "z", z, (batch, dim))
    if D is not None:
        _expect(op, "D", D, (dim,))
        D = D.contiguous()
    if delta_bias is not None:
        _expect(op, "delta_bias", delta_bias, (dim,))
        delta_bias = delta_bias.contiguous()
    out = torch.empty(batch, dim, dtype=x.dtype, device=x.device) if out is None else out
    _expect(op, "out", out, (batch, dim))
    if batch == 0 or dim == 0:
        return out
    block_n = triton.next_power_of_2(dstate)
    block, warps = _launch_config(batch, dim, block_n)
    w = x if dt_weight is None else dt_weight
    _ssm_update_kernel[(batch, triton.cdiv(dim, block))](
        state,
        x,
        dt,
        w,
        A,
        B,
        C,
        x if D is None else D,
        x if z is None else z,
        x if delta_bias is None else delta_bias,
        out,
        dim,
        dstate,
        rank,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *(w.stride() if dt_weight is not None else (0, 0)),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        *(z.stride() if z is not None else (0, 0)),
        *out.stride(),
        FUSED_DT=dt_weight is not None,
        A_FROM_LOG=a_from_log,
        HAS_DT_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        BLOCK_D=block,
        BLOCK_N=block_n,
        BLOCK_R=min(_BLOCK_R, triton.next_power_of_2(max(rank, 1))),
        num_warps=warps,
    )
    return out


def mamba_decode_step(
    u: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    in_proj_weight: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    out_proj_weight: Tensor,
) -> Tensor:
    """One token through a Mamba mixer: u (B, D) -> (B, D), updating both caches in place.

    conv_state: (B, K-1, D_in); ssm_state: (B, D_in, N) fp32; in_proj_weight: (2 D_in, D);
    conv_weight: (D_in, K); x_proj_weight: (R + 2N, D_in); dt_proj_weight: (D_in, R); A_log: (D_in, N)
    fp32; D, dt_proj_bias: (D_in,); out_proj_weight: (D, D_in). Triton kernels when the backend resolves
    to "triton" (the dt_proj GEMV and A = -exp(A_log) then run inside the SSM kernel), the references
    otherwise.
    """
    rank, dstate = dt_proj_weight.shape[1], ssm_state.shape[2]
    x, z = F.linear(u, in_proj_weight).chunk(2, dim=-1)
    if resolve_backend(u, has_triton=True) == "triton":
        x = conv_update_triton(x, conv_state, conv_weight, conv_bias, "silu")
        dt_low, B, C = F.linear(x, x_proj_weight).split([rank, dstate, dstate], dim=-1)
        y = ssm_update_triton(
            ssm_state, x, dt_low, A_log, B, C, D, z, dt_proj_bias, True, dt_weight=dt_proj_weight, a_from_log=True
        )
    else:
        x = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, "silu")
        dt_low, B, C = F.linear(x, x_proj_weight).split([rank, dstate, dstate], dim=-1)
        dt = F.linear(dt_low, dt_proj_weight)
        A = -torch.exp(A_log.float())
        y = selective_state_update(ssm_state, x, dt, A, B, C, D, z, dt_proj_bias, True)
    return F.linear(y, out_proj_weight)
