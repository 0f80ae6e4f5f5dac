"""RMSNorm (the per-block norm of BlackMamba): y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32.

`add_rms_norm` fuses the residual add in front of the norm: the residual stream stays fp32, while the norm
sees it rounded to the weight's dtype, as the released model does. The Triton path reads each input once and
writes each output once; the backward recomputes the normalised row from the saved residual and per-row rstd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import resolve_backend
from .moe_decode import route_kernels_apply, route_top1, route_top1_ref
from .settings import get_settings
from .tl_math import pdl_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the "triton" backend then refuses to run
    triton = None

_MAX_WIDTH = 65536


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x: (..., D); weight: (D,). fp32 math, output in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_ref(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Residual add then RMSNorm. x: (..., D) fp32 residual; delta: like x in any dtype, or None; weight: (D,).

    Returns (y, r_new): r_new = x + delta in fp32, y = RMSNorm(r_new rounded to weight's dtype) in weight's dtype.
    """
    r_new = x.float() if delta is None else x.float() + delta.float()
    rr = r_new.to(weight.dtype).float()
    y = rr * torch.rsqrt(rr.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(weight.dtype), r_new


if triton is not None:
    from .tl_math import pdl_wait, top1_sigmoid

    @triton.jit
    def _add_norm_row(
        x_ptr, delta_ptr, w_ptr, r_ptr, row, cols, mask, stride_x_t, stride_delta_t, stride_r_t, n_cols, eps,
        HAS_DELTA: tl.constexpr, STORE_R: tl.constexpr, ROUND: tl.constexpr,
    ):  # fmt: skip
        """One row: r = x + delta (fp32, stored to r_ptr), then (rstd, y = r' * rstd * w in fp32) where r' is r
        rounded to the weight's dtype with ROUND."""
        r = tl.load(x_ptr + row * stride_x_t + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            r += tl.load(delta_ptr + row * stride_delta_t + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_R:
            tl.store(r_ptr + row * stride_r_t + cols, r, mask=mask)
        if ROUND:
            r = r.to(w_ptr.dtype.element_ty).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        return rstd, r * rstd * w

    @triton.jit
    def _add_rms_norm_fwd_kernel(
        x_ptr, delta_ptr, w_ptr, y_ptr, r_ptr, rstd_ptr,
        stride_x_t, stride_delta_t, stride_y_t, stride_r_t,
        n_cols, eps,
        BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr, STORE_R: tl.constexpr, ROUND: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        rstd, y = _add_norm_row(
            x_ptr, delta_ptr, w_ptr, r_ptr, row, cols, mask, stride_x_t, stride_delta_t, stride_r_t, n_cols, eps,
            HAS_DELTA, STORE_R, ROUND,
        )  # fmt: skip
        tl.store(rstd_ptr + row, rstd)
        tl.store(y_ptr + row * stride_y_t + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_bwd_kernel(
        r_ptr, rstd_ptr, w_ptr, dy_ptr, dres_ptr, dx_ptr, ddelta_ptr, dw_part_ptr,
        stride_r_t, stride_dy_t, stride_dres_t, stride_dx_t, stride_ddelta_t,
        n_rows, n_cols,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DRES: tl.constexpr, HAS_DDELTA: tl.constexpr, ROUND: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        # ROWS is a compile-time constant: the interpreter cannot loop to a runtime bound.
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            m = mask & (row < n_rows)  # only the last program runs past the end
            r = tl.load(r_ptr + row * stride_r_t + cols, mask=m, other=0.0).to(tl.float32)
            if ROUND:
                r = r.to(w_ptr.dtype.element_ty).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
            dy = tl.load(dy_ptr + row * stride_dy_t + cols, mask=m, other=0.0).to(tl.float32)
            rhat = r * rstd
            dw += dy * rhat
            g = dy * w
            # d/dr of r * rstd(r): rstd * (g - rhat * mean(g * rhat))
            dr = rstd * (g - rhat * (tl.sum(g * rhat, axis=0) / n_cols))
            if HAS_DRES:
                dr += tl.load(dres_ptr + row * stride_dres_t + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * stride_dx_t + cols, dr.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_DDELTA:
                tl.store(ddelta_ptr + row * stride_ddelta_t + cols, dr.to(ddelta_ptr.dtype.element_ty), mask=m)
        tl.store(dw_part_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)

    @triton.jit
    def _add_rms_norm_route_kernel(
        x_ptr, delta_ptr, w_ptr, y_ptr, r_ptr, router_w_ptr, router_b_ptr, expert_ptr, gate_ptr,
        stride_x_t, stride_delta_t, stride_y_t, stride_r_t, stride_router_w_e,
        n_cols, n_experts, eps,
        BLOCK_D: tl.constexpr, E_P2: tl.constexpr, HAS_DELTA: tl.constexpr, ROUND: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        # The forward above for one row, then the MoE router on the normalised row as stored: fp32 logits,
        # sigmoid, top-1 (lowest index on ties, as torch.max). The router's weights are parameters: read
        # before the PDL wait.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        e = tl.arange(0, E_P2)
        e_ok = e < n_experts
        rw_ptrs = router_w_ptr + e[:, None] * stride_router_w_e + cols[None, :]
        rw = tl.load(rw_ptrs, mask=e_ok[:, None] & mask[None, :], other=0.0)
        pdl_wait(PDL)
        _, y = _add_norm_row(
            x_ptr, delta_ptr, w_ptr, r_ptr, row, cols, mask, stride_x_t, stride_delta_t, stride_r_t, n_cols, eps,
            HAS_DELTA, True, ROUND,
        )  # fmt: skip
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_y_t + cols, y, mask=mask)
        logits = tl.sum(rw.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
        expert, gate = top1_sigmoid(logits + tl.load(router_b_ptr + e, mask=e_ok, other=0.0).to(tl.float32), e_ok, E_P2)
        tl.store(expert_ptr + row, expert.to(tl.int64))
        tl.store(gate_ptr + row, gate)


def _rows(t: Tensor) -> Tensor:
    """(..., D) -> (T, D) with unit stride along D (copies only when it must)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_config(width: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of ``width`` elements held whole in registers."""
    if width > _MAX_WIDTH:
        raise ValueError(f"RMSNorm kernel supports widths up to {_MAX_WIDTH}, got {width}")
    block = triton.next_power_of_2(width)
    return block, min(max(block // 256, 1), 8)


def _fwd(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype, store_r: bool, round_: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """x, delta: (T, D); returns y (T, D) in out_dtype, r = x + delta in fp32 (or None), rstd (T,) fp32."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x, dtype=out_dtype)
    r = torch.empty_like(x, dtype=torch.float32) if store_r else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, warps = _launch_config(n_cols)
    d = x if delta is None else delta
    rr = y if r is None else r
    if n_rows == 0:
        return y, r, rstd
    pdl = pdl_launch(x, n_rows)
    _add_rms_norm_fwd_kernel[(n_rows,)](
        x, d, weight, y, rr, rstd,
        x.stride(0), d.stride(0), y.stride(0), rr.stride(0),
        n_cols, eps,
        BLOCK_D=block, HAS_DELTA=delta is not None, STORE_R=store_r, ROUND=round_, PDL=pdl, num_warps=warps,
        launch_pdl=pdl,
    )  # fmt: skip
    return y, r, rstd


def _bwd(
    r: Tensor,
    rstd: Tensor,
    weight: Tensor,
    dy: Tensor,
    dres: Tensor | None,
    dx_dtype: torch.dtype,
    ddelta_dtype: torch.dtype | None,
    round_: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """r, dy, dres: (T, D). Returns dx (T, D), ddelta (T, D) or None, dweight (D,) in weight's dtype."""
    n_rows, n_cols = r.shape
    dx = torch.empty_like(r, dtype=dx_dtype)
    ddelta = None if ddelta_dtype is None else torch.empty_like(r, dtype=ddelta_dtype)
    if n_rows == 0:
        return dx, ddelta, torch.zeros_like(weight)
    # Each program walks a contiguous run of rows and keeps its dweight partial in registers.
    programs = torch.cuda.get_device_properties(r.device).multi_processor_count * 4 if r.is_cuda else 4
    rows_per_program = triton.next_power_of_2(triton.cdiv(n_rows, programs))  # few distinct compiled variants
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_part = torch.empty(programs, n_cols, dtype=torch.float32, device=r.device)
    block, warps = _launch_config(n_cols)
    dres_ = dx if dres is None else dres
    ddelta_ = dx if ddelta is None else ddelta
    _add_rms_norm_bwd_kernel[(programs,)](
        r, rstd, weight, dy, dres_, dx, ddelta_, dw_part,
        r.stride(0), dy.stride(0), dres_.stride(0), dx.stride(0), ddelta_.stride(0),
        n_rows, n_cols,
        ROWS=rows_per_program, BLOCK_D=block,
        HAS_DRES=dres is not None, HAS_DDELTA=ddelta is not None, ROUND=round_, num_warps=warps,
    )  # fmt: skip
    return dx, ddelta, dw_part.sum(0).to(weight.dtype)


class _AddRMSNormFn(torch.autograd.Function):
    """(x, delta, weight) -> (y, r_new). With nothing to add, r_new is x itself unless an fp32 copy is asked for."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps, out_dtype, round_, keep_residual):
        shape = x.shape
        if weight.shape != (shape[-1],):
            raise ValueError(f"weight must have shape ({shape[-1]},), got {tuple(weight.shape)}")
        if delta is not None and delta.shape != shape:
            raise ValueError(f"delta shape {tuple(delta.shape)} differs from x shape {tuple(shape)}")
        if not all(t is None or t.is_floating_point() for t in (x, delta, weight)):
            raise TypeError("x, delta and weight must be floating point")
        if not (x.device == weight.device and (delta is None or delta.device == x.device)):
            raise ValueError("x, delta and weight must be on one device")
        x2 = _rows(x)
        store_r = delta is not None or (keep_residual and x.dtype != torch.float32)
        y, r, rstd = _fwd(
            x2, None if delta is None else _rows(delta), weight.contiguous(), eps, out_dtype, store_r, round_
        )
        r_new = x if r is None else r.view(shape)
        ctx.save_for_backward(x2 if r is None else r, rstd, weight)
        ctx.meta = (x.dtype, None if delta is None else delta.dtype, round_, shape)
        ctx.set_materialize_grads(False)
        return y.view(shape), r_new

    @staticmethod
    def backward(ctx, dy, dres):
        r, rstd, weight = ctx.saved_tensors
        x_dtype, delta_dtype, round_, shape = ctx.meta
        ddelta_dtype = delta_dtype if ctx.needs_input_grad[1] else None
        if dy is None:  # only the residual was used: the norm contributes nothing
            ddelta = None if ddelta_dtype is None else dres.to(ddelta_dtype)
            return dres.to(x_dtype), ddelta, None, None, None, None, None
        dres = None if dres is None else _rows(dres)
        dx, ddelta, dw = _bwd(r, rstd, weight.contiguous(), _rows(dy), dres, x_dtype, ddelta_dtype, round_)
        return dx.view(shape), None if ddelta is None else ddelta.view(shape), dw, None, None, None, None


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Residual add then RMSNorm on the selected backend; same arguments and results as `add_rms_norm_ref`."""
    if resolve_backend(x, has_triton=True) == "triton":
        return _AddRMSNormFn.apply(x, delta, weight, eps, weight.dtype, weight.dtype != torch.float32, True)
    return add_rms_norm_ref(x, delta, weight, eps)


def add_rms_norm_route_ref(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, router_weight: Tensor, router_bias: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`add_rms_norm_ref`, then the MoE router on its output: (y, r_new, expert (T,) int64, gate (T,) fp32),
    with expert and gate as ``top1_sigmoid(F.linear(y.float(), router_weight.float(), router_bias.float()))``
    for the rows of y flattened to (T, D)."""
    y, r_new = add_rms_norm_ref(x, delta, weight, eps)
    expert, gate = route_top1_ref(y.reshape(-1, y.shape[-1]), router_weight, router_bias)
    return y, r_new, expert, gate


def add_rms_norm_route(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, router_weight: Tensor, router_bias: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The MoE block's decode step up to its routing: residual add, RMSNorm, top-1 router; same arguments and
    results as `add_rms_norm_route_ref`. One launch of `add_rms_norm_route_triton` when the routing kernels
    apply (:func:`.moe_decode.route_kernels_apply`, any token count) and the ``fuse_router`` setting is on; else
    :func:`add_rms_norm` then :func:`.moe_decode.route_top1`, each on its own backend."""
    if get_settings().fuse_router and route_kernels_apply(x, *(t for t in (delta, weight) if t is not None)):
        return add_rms_norm_route_triton(x, delta, weight, eps, router_weight, router_bias)
    y, r_new = add_rms_norm(x, delta, weight, eps)
    expert, gate = route_top1(y.reshape(-1, y.shape[-1]), router_weight, router_bias)
    return y, r_new, expert, gate


def add_rms_norm_route_triton(
    x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, router_weight: Tensor, router_bias: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Residual add, RMSNorm and the MoE block's top-1 router in one launch (inference: no autograd).

    The router needs the whole normalised row, which the norm's program already holds, so routing costs no
    launch of its own. Same results as `add_rms_norm_route_ref` (the logits up to the order of the sum).
    ``x`` is the fp32 residual (..., D), ``router_weight`` (E, D), ``router_bias`` (E,).
    """
    shape = x.shape
    n_exp = router_weight.shape[0]
    if weight.shape != (shape[-1],) or router_weight.shape != (n_exp, shape[-1]) or router_bias.shape != (n_exp,):
        raise ValueError(
            f"add_rms_norm_route: want weight ({shape[-1]},), router weight (E, {shape[-1]}) and bias (E,); got "
            f"{tuple(weight.shape)}, {tuple(router_weight.shape)}, {tuple(router_bias.shape)}"
        )
    if delta is not None and delta.shape != shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} differs from x shape {tuple(shape)}")
    x2 = _rows(x)
    d2 = x2 if delta is None else _rows(delta)
    n_rows, n_cols = x2.shape
    y = torch.empty(n_rows, n_cols, dtype=weight.dtype, device=x.device)
    r = torch.empty(n_rows, n_cols, dtype=torch.float32, device=x.device)
    expert = torch.empty(n_rows, dtype=torch.long, device=x.device)
    gate = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rw = router_weight if router_weight.stride(1) == 1 else router_weight.contiguous()
    if n_rows:
        block, warps = _launch_config(n_cols)
        # The kernel reads the router's weights before its PDL wait: only the parameter itself, never a copy
        # made just now by the kernel before it.
        pdl = pdl_launch(x, n_rows) and rw is router_weight
        _add_rms_norm_route_kernel[(n_rows,)](
            x2, d2, weight.contiguous(), y, r, rw, router_bias.contiguous(), expert, gate,
            x2.stride(0), d2.stride(0), y.stride(0), r.stride(0), rw.stride(0),
            n_cols, n_exp, eps,
            BLOCK_D=block, E_P2=max(2, triton.next_power_of_2(n_exp)), HAS_DELTA=delta is not None,
            ROUND=weight.dtype != torch.float32, PDL=pdl, num_warps=warps, launch_pdl=pdl,
        )  # fmt: skip
    return y.view(shape), r.view(shape), expert, gate


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm on the selected backend; same arguments and result as `rms_norm_ref`."""
    if resolve_backend(x, has_triton=True) == "triton":
        return _AddRMSNormFn.apply(x, None, weight, eps, x.dtype, False, False)[0]
    return rms_norm_ref(x, weight, eps)
