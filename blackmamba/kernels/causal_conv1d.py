"""Causal depthwise conv1d (width K) with optional SiLU, in (B, L, D) layout.

    y_t[c] = act( bias[c] + sum_{k<K} weight[c, k] * x_{t-K+1+k}[c] ),   x_{<0} = initial_state or 0

``initial_state`` (B, K-1, D) holds the K-1 inputs that precede the sequence (the decode cache), so a
long input can be processed in pieces. The final state is the last K-1 inputs of the padded sequence.

The Triton path tiles (L, D) per batch element: the forward reads each x tile (plus its K-1 row halo, from
cache) once and writes y once. The backward recomputes the pre-activation z, so nothing but x is saved, and
forms dx as the anti-causal conv of dz; dweight and dbias come from per-tile fp32 partial sums reduced in torch.
x may be a strided view such as ``in_proj(u).chunk(2, -1)[0]``: only unit stride along D is needed.

Decoding: :func:`causal_conv1d_update` (reference) and :func:`conv_update_triton` shift the conv window
(S, K-1, D) of one token per row in place and return the activated output; :func:`conv_update` picks one.
The kernel is memory bound (one read and one write of the window); the new input enters the window in
the window's dtype, as in the reference, and the arithmetic is fp32. Row b may use any window of a pool
(``state_indices``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend
from .tl_math import check_state_indices, decode_launch_config, expect_shape, pdl_launch, pdl_wait, round_to_bf16

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the "triton" backend then refuses to run
    triton = None


if triton is not None:

    @triton.jit
    def _load_padded(
        x_ptr, init_ptr, rows, cols, cmask, seqlen, stride_x_l, stride_init_l, K: tl.constexpr, HAS_INIT: tl.constexpr
    ):
        """fp32 tile of the padded input at sequence rows ``rows``: x for 0 <= row < seqlen, the initial state (or
        0) for the K-1 rows before it, 0 elsewhere. x_ptr and init_ptr already point at this batch element and share
        a dtype: each row picks its source pointer, so a tile costs one load whichever side of 0 it lies."""
        rows64 = rows.to(tl.int64)
        if HAS_INIT:
            first = -(K - 1)
            base = tl.where(rows >= 0, x_ptr + rows64 * stride_x_l, init_ptr + (rows64 + (K - 1)) * stride_init_l)
        else:
            first = 0
            base = x_ptr + rows64 * stride_x_l
        mask = ((rows >= first) & (rows < seqlen))[:, None] & cmask[None, :]
        return tl.load(base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _grad_pre_activation(
        x_ptr, init_ptr, w_ptr, dy_ptr, bias, rows, cols, cmask, seqlen,
        stride_x_l, stride_init_l, stride_dy_l, stride_w_d, stride_w_k,
        K: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    ):  # fmt: skip
        """dL/dz at sequence rows ``rows`` (zero outside [0, seqlen)); the SiLU recomputes z from x."""
        rows64 = rows.to(tl.int64)
        in_seq = ((rows >= 0) & (rows < seqlen))[:, None] & cmask[None, :]
        dz = tl.load(dy_ptr + rows64[:, None] * stride_dy_l + cols[None, :], mask=in_seq, other=0.0).to(tl.float32)
        if SILU:
            z = tl.zeros_like(dz) + bias[None, :]
            for i in tl.static_range(K):
                w = tl.load(w_ptr + cols * stride_w_d + i * stride_w_k, mask=cmask, other=0.0).to(tl.float32)
                x_i = _load_padded(
                    x_ptr, init_ptr, rows - (K - 1) + i, cols, cmask, seqlen, stride_x_l, stride_init_l, K, HAS_INIT
                )
                z += w[None, :] * x_i
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        return dz

    @triton.jit
    def _causal_conv1d_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, init_ptr, y_ptr,
        seqlen, dim,
        stride_x_b, stride_x_l, stride_w_d, stride_w_k, stride_init_b, stride_init_l, stride_y_b, stride_y_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One (BLOCK_L, BLOCK_D) tile of y; the K-1 rows of halo above it are re-read from cache.
        pid_l, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        x_ptr += b * stride_x_b
        init_ptr += b * stride_init_b
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            w = tl.load(w_ptr + cols * stride_w_d + k * stride_w_k, mask=cmask, other=0.0).to(tl.float32)
            x_k = _load_padded(
                x_ptr, init_ptr, rows - (K - 1) + k, cols, cmask, seqlen, stride_x_l, stride_init_l, K, HAS_INIT
            )
            acc += w[None, :] * x_k
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        out = y_ptr + b * stride_y_b + rows.to(tl.int64)[:, None] * stride_y_l + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rows < seqlen)[:, None] & cmask[None, :])

    @triton.jit
    def _causal_conv1d_bwd_kernel(
        x_ptr, w_ptr, bias_ptr, init_ptr, dy_ptr, dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr,
        seqlen, dim, n_row_blocks,
        stride_x_b, stride_x_l, stride_w_d, stride_w_k, stride_init_b, stride_init_l, stride_dy_b, stride_dy_l,
        stride_dx_b, stride_dx_l, stride_dinit_b, stride_dinit_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DINIT: tl.constexpr,
        SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Tiles cover the padded rows r in [-(K-1), seqlen): rows < 0 are the initial state. The gradient of a padded
        # input is the anti-causal conv  dX[r] = sum_k w[k] dz[r + K-1 - k]; the k = K-1 term (dz at the tile's own
        # rows) also gives this tile's partial sums of dweight and dbias, so each output row is counted once.
        pid_l, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L) - (K - 1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        x_ptr += b * stride_x_b
        init_ptr += b * stride_init_b
        dy_ptr += b * stride_dy_b
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        blk = b * n_row_blocks + pid_l
        dx = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            dz = _grad_pre_activation(
                x_ptr, init_ptr, w_ptr, dy_ptr, bias, rows + (K - 1 - k), cols, cmask, seqlen,
                stride_x_l, stride_init_l, stride_dy_l, stride_w_d, stride_w_k, K, HAS_INIT, SILU,
            )  # fmt: skip
            w = tl.load(w_ptr + cols * stride_w_d + k * stride_w_k, mask=cmask, other=0.0).to(tl.float32)
            dx += w[None, :] * dz
            if k == K - 1:
                for i in tl.static_range(K):
                    xi = _load_padded(
                        x_ptr, init_ptr, rows - (K - 1) + i, cols, cmask, seqlen, stride_x_l, stride_init_l, K, HAS_INIT
                    )
                    tl.store(dw_part_ptr + (blk * K + i) * dim + cols, tl.sum(dz * xi, axis=0), mask=cmask)
                if HAS_BIAS:
                    tl.store(db_part_ptr + blk * dim + cols, tl.sum(dz, axis=0), mask=cmask)
        rows64 = rows.to(tl.int64)
        in_x = ((rows >= 0) & (rows < seqlen))[:, None] & cmask[None, :]
        dx_ptrs = dx_ptr + b * stride_dx_b + rows64[:, None] * stride_dx_l + cols[None, :]
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=in_x)
        if HAS_DINIT:
            in_s = (rows < 0)[:, None] & cmask[None, :]
            out = dinit_ptr + b * stride_dinit_b + (rows64 + (K - 1))[:, None] * stride_dinit_l + cols[None, :]
            tl.store(out, dx.to(dinit_ptr.dtype.element_ty), mask=in_s)

    @triton.jit
    def conv_window_step(
        x_new, state, w, bias, mask, stride_state_k, stride_w_k,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    ):  # fmt: skip
        """One decode step of the conv for a tile of channels: ``state`` and ``w`` point at window slot 0 and
        tap 0 of each channel (any tile shape), ``bias`` at its bias, ``x_new`` is the new input already in the
        window's dtype. Shifts the window in place (the oldest input leaves, x_new enters) and returns
        act(conv) in fp32, summed in the reference's order: the newest tap first, then the window, then the
        bias. Shared by the conv step kernel and the GEMV's conv epilogue (:mod:`.gemv`)."""
        acc = tl.load(w + (K - 1) * stride_w_k, mask=mask, other=0.0).to(tl.float32) * x_new.to(tl.float32)
        for k in tl.static_range(K - 1):
            s = tl.load(state + k * stride_state_k, mask=mask, other=0.0)
            acc += tl.load(w + k * stride_w_k, mask=mask, other=0.0).to(tl.float32) * s.to(tl.float32)
            if k > 0:  # slot k-1 was read in the previous iteration, so it can take slot k's value now
                tl.store(state + (k - 1) * stride_state_k, s, mask=mask)
        if K > 1:
            tl.store(state + (K - 2) * stride_state_k, x_new, mask=mask)
        if HAS_BIAS:
            acc += tl.load(bias, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        return acc

    @triton.jit
    def _conv_update_kernel(
        x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, state_indices_ptr,
        dim,
        stride_x_b, stride_x_d, stride_state_b, stride_state_k, stride_state_d, stride_w_d, stride_w_k,
        stride_y_b, stride_y_d,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_STATE_INDICES: tl.constexpr,
        BLOCK_D: tl.constexpr, PDL: tl.constexpr, RNE: tl.constexpr,
    ):  # fmt: skip
        # One program: (row b, BLOCK_D channels); row b shifts window state_indices[b] (b without indices). RNE:
        # a bf16 output rounded by hand (Triton's interpreter, whose casts truncate).
        pdl_wait(PDL)
        b = tl.program_id(0).to(tl.int64)
        if HAS_STATE_INDICES:
            slot = tl.load(state_indices_ptr + b).to(tl.int64)
        else:
            slot = b
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = d < dim
        # The new input enters the window in the window's dtype, as in the reference.
        x_new = tl.load(x_ptr + b * stride_x_b + d * stride_x_d, mask=mask, other=0.0).to(state_ptr.dtype.element_ty)
        acc = conv_window_step(
            x_new, state_ptr + slot * stride_state_b + d * stride_state_d, w_ptr + d * stride_w_d, bias_ptr + d, mask,
            stride_state_k, stride_w_k, K, HAS_BIAS, SILU,
        )  # fmt: skip
        if RNE:
            acc = round_to_bf16(acc)
        tl.store(y_ptr + b * stride_y_b + d * stride_y_d, acc.to(y_ptr.dtype.element_ty), mask=mask)


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


def _finish(
    y: Tensor, xp: Tensor, dtype: torch.dtype, width: int, activation: str | None, return_final_state: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """The end of both PyTorch paths: the activation on the fp32 conv ``y``, the result in ``dtype``, and the
    final state (the last K-1 rows of the padded input ``xp``) when asked for."""
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}")
    y = y.to(dtype)
    return (y, xp[:, xp.shape[1] - (width - 1) :]) if return_final_state else y


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
    return _finish(y, xp, x.dtype, width, activation, return_final_state)


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
    return _finish(y, xp, x.dtype, width, activation, return_final_state)


def _unit_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim has unit stride (rows may be strided), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_triton_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, initial_state: Tensor | None
) -> None:
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"causal_conv1d: x must be (B, L, D) and weight (D, K); got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"causal_conv1d: x must be fp32, fp16 or bf16, got {x.dtype}")
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}")
    batch, _, dim = x.shape
    width = weight.shape[1]
    if width < 1:
        raise ValueError("causal_conv1d: the kernel width K must be at least 1")
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"causal_conv1d: bias must be ({dim},), got {tuple(bias.shape)}")
    if initial_state is not None and initial_state.shape != (batch, width - 1, dim):
        raise ValueError(
            f"causal_conv1d: initial_state must be {(batch, width - 1, dim)}, got {tuple(initial_state.shape)}"
        )
    if initial_state is not None and initial_state.dtype != x.dtype:
        raise TypeError(f"causal_conv1d: initial_state must have x's dtype {x.dtype}, got {initial_state.dtype}")
    for t in (weight, bias, initial_state):
        if t is not None and t.device != x.device:
            raise ValueError(f"causal_conv1d: all inputs must be on {x.device}, got one on {t.device}")


def _check_blocks(block_l: int, block_d: int) -> None:
    for b in (block_l, block_d):
        if b < 1 or b & (b - 1):
            raise ValueError(f"causal_conv1d: block sizes must be powers of two, got {block_l}, {block_d}")


def causal_conv1d_fwd_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    out: Tensor | None = None,
    block_l: int = 16,
    block_d: int = 128,
    num_warps: int = 2,
) -> Tensor:
    """Forward kernel launch. x: (B, L, D), rows may be strided; weight: (D, K); bias: (D,); initial_state:
    (B, K-1, D). Returns y (B, L, D) in x's dtype (written into ``out`` when given)."""
    _check_triton_inputs(x, weight, bias, activation, initial_state)
    _check_blocks(block_l, block_d)
    x = _unit_stride(x)
    batch, length, dim = x.shape
    if out is None:
        out = torch.empty(batch, length, dim, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError("causal_conv1d: out must match x's shape and dtype with unit stride along D")
    if out.numel() == 0:
        return out
    init = x if initial_state is None else _unit_stride(initial_state)
    grid = (triton.cdiv(length, block_l), triton.cdiv(dim, block_d), batch)
    _causal_conv1d_fwd_kernel[grid](
        x, weight, x if bias is None else bias, init, out,
        length, dim,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), init.stride(0), init.stride(1),
        out.stride(0), out.stride(1),
        K=weight.shape[1], HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        SILU=activation == "silu", BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


def causal_conv1d_bwd_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    initial_state: Tensor | None,
    dy: Tensor,
    dx: Tensor | None = None,
    dinitial_state: Tensor | None = None,
    initial_state_grad: bool = True,
    block_l: int = 64,
    block_d: int = 64,
    num_warps: int = 8,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Backward kernel launch: (dx, d initial_state, dweight, dbias), each in its input's dtype.

    d initial_state is None unless ``initial_state`` is given and ``initial_state_grad``; dbias is None without a
    bias. dweight and dbias are reduced in torch from per-tile fp32 partial sums (deterministic).
    """
    _check_triton_inputs(x, weight, bias, activation, initial_state)
    _check_blocks(block_l, block_d)
    if dy.shape != x.shape:
        raise ValueError(f"causal_conv1d: dy must be {tuple(x.shape)}, got {tuple(dy.shape)}")
    x, dy = _unit_stride(x), _unit_stride(dy)
    batch, length, dim = x.shape
    width = weight.shape[1]
    if dx is None:
        dx = torch.empty(batch, length, dim, dtype=x.dtype, device=x.device)
    want_dinit = initial_state is not None and initial_state_grad
    if want_dinit and dinitial_state is None:
        dinitial_state = torch.empty(batch, width - 1, dim, dtype=initial_state.dtype, device=x.device)
    for out, like in ((dx, x), (dinitial_state if want_dinit else None, initial_state)):
        if out is not None and (out.shape != like.shape or out.dtype != like.dtype or out.stride(-1) != 1):
            raise ValueError("causal_conv1d: gradient buffers must match their input's shape and dtype")
    n_row_blocks = triton.cdiv(length + width - 1, block_l)
    dw_part = torch.empty(batch * n_row_blocks, width, dim, dtype=torch.float32, device=x.device)
    db_part = torch.empty(batch * n_row_blocks, dim, dtype=torch.float32, device=x.device) if bias is not None else None
    init = x if initial_state is None else _unit_stride(initial_state)
    dinit = dinitial_state if want_dinit else dx
    db = dw_part if db_part is None else db_part
    if dw_part.numel():
        grid = (n_row_blocks, triton.cdiv(dim, block_d), batch)
        _causal_conv1d_bwd_kernel[grid](
            x, weight, x if bias is None else bias, init, dy, dx, dinit, dw_part, db,
            length, dim, n_row_blocks,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), init.stride(0), init.stride(1),
            dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), dinit.stride(0), dinit.stride(1),
            K=width, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_DINIT=want_dinit,
            SILU=activation == "silu", BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    dweight = dw_part.sum(0).t().to(weight.dtype).contiguous()
    dbias = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dinitial_state if want_dinit else None, dweight, dbias


class CausalConv1dTriton(torch.autograd.Function):
    """Autograd around the Triton kernels; the backward recomputes the pre-activation from x."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        initial_state: Tensor | None,
        activation: str | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.activation = activation
        return causal_conv1d_fwd_triton(x, weight, bias, activation, initial_state)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, initial_state = ctx.saved_tensors
        dx, dinit, dweight, dbias = causal_conv1d_bwd_triton(
            x, weight, bias, ctx.activation, initial_state, dy, initial_state_grad=ctx.needs_input_grad[3]
        )
        return dx, dweight, dbias, dinit, None


def _final_state(x: Tensor, initial_state: Tensor | None, width: int) -> Tensor:
    """The last K-1 inputs of the padded sequence, as a new tensor (differentiable through torch)."""
    batch, length, dim = x.shape
    if length >= width - 1:
        return x[:, length - (width - 1) :].clone(memory_format=torch.contiguous_format)
    left = x.new_zeros(batch, width - 1, dim) if initial_state is None else initial_state
    return torch.cat([left[:, length:], x], dim=1)


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton path (differentiable); same arguments and results as :func:`causal_conv1d_ref`."""
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype)  # as the reference: the state joins x's sequence
    _check_triton_inputs(x, weight, bias, activation, initial_state)
    y = CausalConv1dTriton.apply(x, weight, bias, initial_state, activation)
    return (y, _final_state(x, initial_state, weight.shape[1])) if return_final_state else y


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv on the selected backend; see :func:`causal_conv1d_ref`."""
    backend = resolve_backend(x, has_triton=True)
    if backend == "triton":
        return causal_conv1d_triton(x, weight, bias, activation, initial_state, return_final_state)
    impl = causal_conv1d_ref if backend == "ref" else causal_conv1d_shifted
    return impl(x, weight, bias, activation, initial_state, return_final_state)


def causal_conv1d_update(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    state_indices: Tensor | None = None,
) -> Tensor:
    """One decode step. x: (B, D) the new input; state: (S, K-1, D) the previous inputs, shifted in place;
    row b of x uses window ``state_indices[b]`` (row b without indices; S = B then). Returns (B, D) in x's dtype."""
    rows = state if state_indices is None else state.index_select(0, state_indices)
    window = torch.cat([rows, x[:, None].to(state.dtype)], dim=1)  # (B, K, D)
    y = torch.einsum("bkd,dk->bd", window.float(), weight.float())
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    if state_indices is None:
        state.copy_(window[:, 1:])
    else:
        state.index_copy_(0, state_indices, window[:, 1:])
    return y.to(x.dtype)


def check_conv_step(
    op: str,
    batch: int,
    dim: int,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    state_indices: Tensor | None,
    prefix: str = "",
    error: type[ValueError] = ValueError,
) -> None:
    """The arguments of a conv decode step over ``batch`` rows of ``dim`` channels, as :func:`conv_update_triton`
    and :func:`.gemv.linear_conv_triton` take them: weight (D, K), the windows (S, K-1, D) with S = batch unless
    the rows pick their windows (``state_indices``), bias (D,), activation "silu" or None. ``prefix`` goes
    before the arguments' names in the messages (linear_conv's are conv_state, conv_weight, conv_bias)."""
    if weight.ndim != 2:
        raise error(f"{op}: {prefix}weight must be (D, K); got {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise error(f"{op}: unknown activation {activation!r}")
    width = weight.shape[1]
    expect_shape(op, f"{prefix}weight", weight, (dim, width))
    expect_shape(op, f"{prefix}state", state, (batch if state_indices is None else state.shape[0], width - 1, dim))
    check_state_indices(op, state_indices, batch, state.device)
    if bias is not None:
        expect_shape(op, f"{prefix}bias", bias, (dim,))


def conv_update_triton(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    state_indices: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One conv decode step in one launch; same semantics as :func:`causal_conv1d_update`.

    x: (B, D) the new input (any strides); state: (S, K-1, D) the windows, shifted in place; weight: (D, K);
    bias: (D,); state_indices: (B,). Returns act(conv) (B, D) in x's dtype, written to ``out`` when given.
    """
    op = "conv_update_triton"
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be (B, D); got {tuple(x.shape)}")
    batch, dim = x.shape
    check_conv_step(op, batch, dim, state, weight, bias, activation, state_indices)
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(batch, dim, dtype=x.dtype, device=x.device) if out is None else out
    expect_shape(op, "out", out, (batch, dim))
    if batch == 0 or dim == 0:
        return out
    block, warps = decode_launch_config(batch, dim, 1)
    pdl = pdl_launch(x, batch)
    _conv_update_kernel[(batch, triton.cdiv(dim, block))](
        x, state, weight, x if bias is None else bias, out, x if state_indices is None else state_indices,
        dim,
        *x.stride(), *state.stride(), *weight.stride(), *out.stride(),
        K=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation == "silu",
        HAS_STATE_INDICES=state_indices is not None,
        BLOCK_D=block, PDL=pdl, RNE=not x.is_cuda and out.dtype == torch.bfloat16, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


def conv_update(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    state_indices: Tensor | None = None,
) -> Tensor:
    """One conv decode step on the selected backend; see :func:`causal_conv1d_update`."""
    if resolve_backend(x, has_triton=True) == "triton":
        return conv_update_triton(x, state, weight, bias, activation, state_indices)
    return causal_conv1d_update(x, state, weight, bias, activation, state_indices)
