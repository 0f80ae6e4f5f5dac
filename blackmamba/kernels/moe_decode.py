"""The MoE layer for a few tokens at a time (decode): routing and both expert GEMMs in three launches.

    logits = W_r x + b_r (fp32);  e, g = argmax / max of sigmoid(logits)
    y = g * W2[e] ( act(a) * b ),   [a ; b] = W1[e] x

At decode time a step has 1-64 tokens, so the layer is bound by reading the weights of the experts in
use, and the sort, offsets and permutation of the general path (:mod:`.moe`) are a dozen launches that
cost more than the reads. Here nothing is permuted:

* :func:`route_top1_triton`: one program per token computes its router logits in fp32, the sigmoid and
  the top-1 expert (the lowest index on ties, as ``torch.max`` picks) in one launch.
* :func:`moe_experts_decode_triton`: two launches over a grid of (expert, column tile). A program loads
  the expert ids of all tokens (at most ``MAX_TOKENS``), exits when none is its expert, and otherwise
  multiplies the tile of the expert's weights with the token block, masked to its tokens. Every weight
  of a used expert is read once; an unused expert's never. fc1 computes both halves and applies the
  gated activation in its epilogue; fc2 scales by the gate and writes each token's row from the one
  program set that owns it, so no scatter or zero-fill is needed. With one token, fc2's column tiles of
  one expert are few (46 at the 2.8B widths), so fc2 can split F over several programs per tile (the
  ``moe_fc2_splits`` setting), summed deterministically in the same launch as :mod:`.gemv` does. A single
  token takes tl.dot padded to 16 rows, or, where its tile entry says DOT=0, the CUDA cores as the GEMV's
  one row does (fp32 products of a (BF, BK) weight tile and x, summed over K at the end; fc2 reads its first
  weight tile before the PDL wait). The tiles are per token count and weight dtype (the ``moe_fc1_tiles``,
  ``moe_fc2_tiles`` settings and their float8 twins).
* float8 (e4m3) experts with fp32 scales per (expert, output channel), ``w1_scale`` (E, 2F) and
  ``w2_scale`` (E, D): tiles are converted to x's dtype in registers (exact) and each accumulator column
  is scaled before the activation (fc1) or the gate (fc2), as :func:`moe_experts_decode_ref` computes on
  the weights dequantized in fp32.

:func:`route_top1` and :func:`moe_experts_decode` are the dispatchers of a decode step: they take these
kernels when :func:`decode_kernels_apply` (the "triton" backend, at most the ``decode_tokens`` setting's
tokens, no autograd, no autocast), else the reference routing and :func:`.moe.moe_experts`.

With PDL (the ``pdl_max_rows`` setting, sm_90) each launch starts while the kernel before it finishes and
waits for it before reading activations (:func:`.tl_math.pdl_wait`); fc2 reads the expert ids before its wait,
since fc1 released it only after fc1's own wait, when the ids were already written.

Rounding follows :func:`.moe.moe_experts_ref` on the GPU: a, b, act(a) and act(a) * b are rounded to x's
dtype (the experts' dtype unless they are float8), fc2's fp32 accumulator is scaled by the fp32 gate and
rounded once. Triton's interpreter truncates float casts, so there the intermediates stay fp32 and torch
rounds the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import inference_kernels_apply
from .gemv import DENSE, FP8, dequantize, one_row_products, split_k, split_k_arrive, split_k_counters, split_k_total
from .moe import _check, _dot_flags, moe_experts, moe_experts_fp8, moe_experts_ref
from .settings import get_settings
from .tl_math import ACTIVATIONS, count_key, gated, pdl_launch, pdl_wait, top1_sigmoid

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched

    def _jit(fn):
        return fn


MAX_TOKENS = 64  # the token block of one program: the most tokens a call may have
ROUTER_TILE = 16384  # elements of the router's weight tile per step (E_P2 x BLOCK_D)
ROUTER_BLOCK_MIN_TOKENS = 64  # routing calls of more tokens take the kernel over blocks of tokens


@_jit
def _route_top1_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    expert_ptr,
    gate_ptr,
    dim,
    n_experts,
    stride_x_t,
    stride_w_e,
    stride_w_d,
    E_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_P2)
    e_ok = e < n_experts
    acc = tl.zeros((E_P2, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        x = tl.load(x_ptr + t * stride_x_t + d, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * stride_w_e + d[None, :] * stride_w_d, mask=e_ok[:, None] & d_ok[None, :])
        acc += w.to(tl.float32) * x[None, :]
    expert, gate = top1_sigmoid(tl.sum(acc, 1) + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32), e_ok, E_P2)
    tl.store(expert_ptr + t, expert.to(tl.int64))
    tl.store(gate_ptr + t, gate)


@_jit
def _route_top1_block_kernel(
    x_ptr, w_ptr, bias_ptr, expert_ptr, gate_ptr, n_tok, dim, n_experts, stride_x_t, stride_w_e, stride_w_d,
    E_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # BLOCK_T tokens per program: logits (BLOCK_T, E_P2) = x_tile @ W^T on tl.dot, fp32 accumulation (exact
    # products for 16-bit inputs; IEEE products for fp32 ones).
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < n_tok
    e = tl.arange(0, E_P2)
    e_ok = e < n_experts
    acc = tl.zeros((BLOCK_T, E_P2), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        x = tl.load(x_ptr + ts[:, None] * stride_x_t + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + d[:, None] * stride_w_d + e[None, :] * stride_w_e, mask=d_ok[:, None] & e_ok[None, :],
                    other=0.0)  # fmt: skip
        if IEEE:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    logits = acc + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    probs = tl.where(e_ok[None, :], tl.sigmoid(logits), -1.0)
    best = tl.max(probs, 1)
    expert = tl.min(tl.where(probs == best[:, None], e[None, :], E_P2), 1)  # the lowest expert on ties
    tl.store(expert_ptr + ts, expert.to(tl.int64), mask=t_ok)
    tl.store(gate_ptr + ts, best, mask=t_ok)


def route_top1_triton(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor) -> tuple[Tensor, Tensor]:
    """Sigmoid top-1 routing in one launch: x (T, D) -> (expert (T,) int64, gate (T,) fp32), the same as
    ``top1_sigmoid(F.linear(x.float(), weight.float(), bias.float()))`` up to the order of the sum."""
    n_tok, dim = x_TD.shape
    n_exp = weight_ED.shape[0]
    if weight_ED.shape != (n_exp, dim) or bias_E.shape != (n_exp,):
        raise ValueError(
            f"route_top1_triton: want weight (E, {dim}) and bias (E,); got {tuple(weight_ED.shape)}, "
            f"{tuple(bias_E.shape)}"
        )
    expert_T = torch.empty(n_tok, dtype=torch.long, device=x_TD.device)
    gate_T = torch.empty(n_tok, dtype=torch.float32, device=x_TD.device)
    if n_tok > ROUTER_BLOCK_MIN_TOKENS:  # many tokens: blocks of them on tl.dot, x read once
        x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
        block_t = 64 if x_TD.is_cuda else 16
        # 16-bit products are exact in fp32; the interpreter multiplies bf16 tiles wrongly (see moe._dot_flags).
        exact_16bit = x_TD.dtype in (torch.bfloat16, torch.float16) and weight_ED.dtype == x_TD.dtype and x_TD.is_cuda
        _route_top1_block_kernel[(triton.cdiv(n_tok, block_t),)](
            x_TD, weight_ED, bias_E.contiguous(), expert_T, gate_T, n_tok, dim, n_exp,
            x_TD.stride(0), weight_ED.stride(0), weight_ED.stride(1),
            E_P2=max(16, triton.next_power_of_2(n_exp)), BLOCK_T=block_t, BLOCK_D=128 if x_TD.is_cuda else 32,
            IEEE=not exact_16bit, num_warps=4 if x_TD.is_cuda else 1,
        )  # fmt: skip
    elif n_tok:
        x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
        pdl = pdl_launch(x_TD, n_tok)
        # All of D in one step on the GPU (one program per token would wait on each step's loads).
        e_p2 = max(2, triton.next_power_of_2(n_exp))
        block = min(triton.next_power_of_2(dim), max(64, ROUTER_TILE // e_p2)) if x_TD.is_cuda else 64
        _route_top1_kernel[(n_tok,)](
            x_TD, weight_ED, bias_E.contiguous(), expert_T, gate_T, dim, n_exp,
            x_TD.stride(0), weight_ED.stride(0), weight_ED.stride(1),
            E_P2=e_p2, BLOCK_D=block, PDL=pdl, num_warps=8 if x_TD.is_cuda else 1, launch_pdl=pdl,
        )  # fmt: skip
    return expert_T, gate_T


@_jit
def _tokens_of(expert_ptr, n_tok, expert, BT: tl.constexpr):
    """Mask (BT,) of the tokens routed to ``expert`` among the first ``n_tok``."""
    ts = tl.arange(0, BT)
    return tl.load(expert_ptr + ts, mask=ts < n_tok, other=-1) == expert


@_jit
def _decode_fc1_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    expert_ptr,
    h_ptr,
    n_tok,
    dim,
    d_ff,
    stride_x_t,
    stride_w_e,
    stride_w_f,
    stride_w_d,
    stride_s_e,
    stride_h_t,
    ACT: tl.constexpr,
    ROUND: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BK: tl.constexpr,
    PDL: tl.constexpr,
    DOT: tl.constexpr,
):
    pdl_wait(PDL)  # the expert ids come from the kernel before
    expert = tl.program_id(0)
    mine = _tokens_of(expert_ptr, n_tok, expert, BT)
    if tl.sum(mine.to(tl.int32), 0) == 0:  # an expert without tokens: its weights are never read
        return
    ts = tl.arange(0, BT)
    fs = tl.program_id(1) * BF + tl.arange(0, BF)
    f_ok = fs < d_ff
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + ts[:, None].to(tl.int64) * stride_x_t + ks[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_w_e
    if DOT:  # the tokens padded to BT rows on tl.dot
        w_ptrs = w_base + fs[None, :] * stride_w_f + ks[:, None] * stride_w_d
        acc_a = tl.zeros((BT, BF), dtype=tl.float32)
        acc_b = tl.zeros((BT, BF), dtype=tl.float32)
        for k0 in range(0, dim, BK):
            k_ok = ks < dim - k0
            x = tl.load(x_ptrs, mask=mine[:, None] & k_ok[None, :], other=0.0)
            wa = tl.load(w_ptrs, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            wb = tl.load(w_ptrs + d_ff * stride_w_f, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            if DOT_F32:
                x, wa, wb = x.to(tl.float32), wa.to(tl.float32), wb.to(tl.float32)
            else:  # fp8 -> x's dtype is exact; a no-op for x's own dtype
                wa, wb = wa.to(x.dtype), wb.to(x.dtype)
            acc_a = tl.dot(x, wa, acc_a, input_precision=PRECISION)
            acc_b = tl.dot(x, wb, acc_b, input_precision=PRECISION)
            x_ptrs += BK
            w_ptrs += BK * stride_w_d
    else:  # one token (BT = 1) on the CUDA cores, as the GEMV's one row: (BF, BK) fp32 products, summed at the end
        w_ptrs = w_base + fs[:, None] * stride_w_f + ks[None, :] * stride_w_d
        prod_a = tl.zeros((BF, BK), dtype=tl.float32)
        prod_b = tl.zeros((BF, BK), dtype=tl.float32)
        for k0 in range(0, dim, BK):
            k_ok = ks < dim - k0
            x = tl.load(x_ptrs, mask=mine[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            wa = tl.load(w_ptrs, mask=f_ok[:, None] & k_ok[None, :], other=0.0)
            wb = tl.load(w_ptrs + d_ff * stride_w_f, mask=f_ok[:, None] & k_ok[None, :], other=0.0)
            prod_a += wa.to(tl.float32) * x
            prod_b += wb.to(tl.float32) * x
            x_ptrs += BK
            w_ptrs += BK * stride_w_d
        acc_a = tl.sum(prod_a, 1)[None, :]
        acc_b = tl.sum(prod_b, 1)[None, :]
    if HAS_SCALE:  # per output channel: sum_k x_k (s W8_k) = s sum_k x_k W8_k
        s_ptrs = scale_ptr + expert.to(tl.int64) * stride_s_e + fs
        acc_a = acc_a * tl.load(s_ptrs, mask=f_ok, other=0.0)[None, :]
        acc_b = acc_b * tl.load(s_ptrs + d_ff, mask=f_ok, other=0.0)[None, :]
    h = gated(acc_a, acc_b, ACT, ROUND, h_ptr.dtype.element_ty)
    h_ptrs = h_ptr + ts[:, None].to(tl.int64) * stride_h_t + fs[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mine[:, None] & f_ok[None, :])


@_jit
def _decode_fc2_kernel(
    h_ptr,
    w_ptr,
    scale_ptr,
    expert_ptr,
    gate_ptr,
    y_ptr,
    part_ptr,
    count_ptr,
    n_tok,
    dim,
    d_ff,
    f_per_split,
    stride_h_t,
    stride_w_e,
    stride_w_d,
    stride_w_f,
    stride_s_e,
    stride_y_t,
    HAS_SCALE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PDL: tl.constexpr,
    DOT: tl.constexpr,
):
    # With PDL, the expert ids are read before the wait: they were written before fc1 ran, and fc1 released
    # this kernel only after its own wait (see tl_math.pdl_wait). Only h, fc1's output, waits.
    expert = tl.program_id(0)
    mine = _tokens_of(expert_ptr, n_tok, expert, BT)
    if tl.sum(mine.to(tl.int32), 0) == 0:  # an expert without tokens: its weights are never read
        return
    ts = tl.arange(0, BT)
    pid_n = tl.program_id(1)
    ns = pid_n * BN + tl.arange(0, BN)
    n_ok = ns < dim
    f_lo = tl.program_id(2) * f_per_split  # this program's range of F (split-K)
    f_hi = tl.minimum(d_ff, f_lo + f_per_split)
    ks = tl.arange(0, BK)
    h_ptrs = h_ptr + ts[:, None].to(tl.int64) * stride_h_t + (f_lo + ks)[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_w_e
    if DOT:  # the tokens padded to BT rows on tl.dot
        w_ptrs = w_base + ns[None, :] * stride_w_d + (f_lo + ks)[:, None] * stride_w_f
        acc = tl.zeros((BT, BN), dtype=tl.float32)
        pdl_wait(PDL)
        for k0 in range(f_lo, f_hi, BK):
            k_ok = ks < f_hi - k0
            h = tl.load(h_ptrs, mask=mine[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                h, w = h.to(tl.float32), w.to(tl.float32)
            else:
                w = w.to(h.dtype)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
            h_ptrs += BK
            w_ptrs += BK * stride_w_f
    else:  # one token (BT = 1) on the CUDA cores, as the GEMV's one row; the first weight tile is read before
        # the PDL wait (the expert is known), each next one a step ahead
        w_ptrs = w_base + ns[:, None] * stride_w_d + (f_lo + ks)[None, :] * stride_w_f
        w = tl.load(w_ptrs, mask=n_ok[:, None] & (ks < f_hi - f_lo)[None, :], other=0.0)
        pdl_wait(PDL)
        acc = one_row_products(w, w_ptrs, h_ptrs, mine[:, None], n_ok, f_lo, f_hi, stride_w_f, BN, BK, BK)
    offs = ts[:, None].to(tl.int64) * stride_y_t + ns[None, :]
    mask = mine[:, None] & n_ok[None, :]
    if SPLIT > 1:  # the last of the tile's SPLIT programs adds the partials in split order (kernels/gemv.py)
        count_ptr += expert * tl.num_programs(1) + pid_n
        if split_k_arrive(acc, part_ptr, offs, mask, n_tok * stride_y_t, tl.program_id(2), count_ptr) != SPLIT - 1:
            return
        acc = split_k_total(part_ptr, offs, mask, n_tok * stride_y_t, count_ptr, SPLIT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + expert.to(tl.int64) * stride_s_e + ns, mask=n_ok, other=0.0)[None, :]
    acc = acc * tl.load(gate_ptr + ts, mask=mine, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# Launch configurations on the GPU by token count: the settings' moe_fc1_tiles / moe_fc2_tiles (the entry of
# the smallest count >= the call's), from benchmarks/tune_moe_decode.py on an H200 (2.8B widths, bf16). fc1
# tiles BF rows of each half of W1, fc2 BN rows of W2; BK is the reduction step. With one token a single
# expert is read, so narrow tiles spread it over many programs; deep BK and several stages keep bytes in
# flight per SM.
_INTERPRETED = dict(BF=16, BN=16, BK=32, num_warps=4, num_stages=1)  # tiny tiles: the CPU runs each program


def _config(table: Mapping[int, Mapping[str, int]], tokens: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """The entry for the smallest token count >= ``tokens`` (else the largest one). The tables are for
    16-bit weights; fp32 tiles take twice the shared memory, so their reduction step is capped. An entry's
    DOT=0 runs a single token on the CUDA cores (as the GEMV's one row) instead of tl.dot on 16 padded rows;
    more tokens always take tl.dot."""
    cfg = dict(table[count_key(table, tokens)])
    if not on_gpu:
        return dict(_INTERPRETED, DOT=cfg.get("DOT", 1))
    if dtype == torch.float32:
        cfg = {**cfg, "BK": min(cfg["BK"], 64), "num_stages": min(cfg["num_stages"], 3)}
    return cfg


def decode_tiles(tokens: int, dtype: torch.dtype, fp8: bool, on_gpu: bool) -> tuple[dict, dict]:
    """fc1's and fc2's tiles for ``tokens`` tokens in ``dtype``: from the ``moe_fp8_fc1_tiles`` /
    ``moe_fp8_fc2_tiles`` settings for float8 experts (``fp8``) where they are set, else from
    ``moe_fc1_tiles`` / ``moe_fc2_tiles``."""
    s = get_settings()
    fc1 = s.moe_fp8_fc1_tiles if fp8 and s.moe_fp8_fc1_tiles else s.moe_fc1_tiles
    fc2 = s.moe_fp8_fc2_tiles if fp8 and s.moe_fp8_fc2_tiles else s.moe_fc2_tiles
    return _config(fc1, tokens, dtype, on_gpu), _config(fc2, tokens, dtype, on_gpu)


def _scaled(w1_EFD: Tensor, w2_EDF: Tensor, w1_scale: Tensor | None, w2_scale: Tensor | None) -> bool:
    """Whether the experts are float8 or carry output-channel scales."""
    return w1_EFD.dtype in FP8 or w2_EDF.dtype in FP8 or w1_scale is not None or w2_scale is not None


def _check_scales(
    x_TD: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, w1_scale: Tensor | None, w2_scale: Tensor | None
) -> bool:
    """Check the experts' dtypes and optional per-(expert, output channel) scales. float8 weights need both
    scales; other weights must have x's dtype."""
    n_exp, two_f, dim = w1_EFD.shape
    fp8 = w1_EFD.dtype in FP8 or w2_EDF.dtype in FP8
    if fp8 and (w1_scale is None or w2_scale is None or w1_EFD.dtype != w2_EDF.dtype):
        raise ValueError(
            f"moe_experts_decode: float8 experts need both scales and one dtype; got {w1_EFD.dtype}, "
            f"{w2_EDF.dtype}, scales {'given' if w1_scale is not None else 'missing'} / "
            f"{'given' if w2_scale is not None else 'missing'}"
        )
    if x_TD.dtype not in DENSE or (not fp8 and (x_TD.dtype != w1_EFD.dtype or w2_EDF.dtype != w1_EFD.dtype)):
        raise ValueError(
            f"moe_experts_decode: x and weights must share a dtype (bf16, fp16, fp32) unless the weights are "
            f"float8; got {x_TD.dtype}, {w1_EFD.dtype}, {w2_EDF.dtype}"
        )
    for name, scale, shape in (("w1_scale", w1_scale, (n_exp, two_f)), ("w2_scale", w2_scale, (n_exp, dim))):
        if scale is not None and (scale.shape != shape or scale.dtype != torch.float32):
            raise ValueError(
                f"moe_experts_decode: {name} must be {shape} float32; got {tuple(scale.shape)} {scale.dtype}"
            )


def _fc2_splits(tokens: int) -> int:
    """The ``moe_fc2_splits`` entry for the smallest token count >= ``tokens`` (else the largest one)."""
    table = get_settings().moe_fc2_splits
    return table[count_key(table, tokens)]


def moe_experts_decode_triton(
    x_TD: Tensor,
    expert_T: Tensor,
    gate_T: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    activation: str = "gelu",
    *,
    w1_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
) -> Tensor:
    """The experts for at most :data:`MAX_TOKENS` tokens in two launches, with no permutation and no
    autograd (inference). Same result as :func:`moe_experts_decode_ref`; expert ids must lie in [0, E).
    ``w1_scale`` (E, 2F) and ``w2_scale`` (E, D) scale the output channels of float8 (e4m3) experts."""
    _check(x_TD, expert_T, gate_T, w1_EFD, w2_EDF)
    n_tok, dim = x_TD.shape
    n_exp, two_f, _ = w1_EFD.shape
    d_ff = two_f // 2
    if n_tok > MAX_TOKENS:
        raise ValueError(f"moe_experts_decode_triton: at most {MAX_TOKENS} tokens per call, got {n_tok}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}")
    _check_scales(x_TD, w1_EFD, w2_EDF, w1_scale, w2_scale)
    dtype = x_TD.dtype
    if n_tok == 0:
        return x_TD.new_empty(0, dim)
    flags = _dot_flags(x_TD)
    work = torch.float32 if flags["DOT_F32"] else dtype  # the interpreter's casts truncate: torch rounds
    x_TD = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
    expert_T = expert_T.contiguous()
    h_TF = torch.empty(n_tok, d_ff, dtype=work, device=x_TD.device)
    y_TD = torch.empty(n_tok, dim, dtype=work, device=x_TD.device)
    c1, c2 = decode_tiles(n_tok, dtype, w1_EFD.dtype in FP8, x_TD.is_cuda)
    dot1, dot2 = (n_tok > 1 or bool(c.get("DOT", 1)) for c in (c1, c2))  # one token may take the CUDA cores
    bt1, bt2 = (max(16, triton.next_power_of_2(n_tok)) if dot else 1 for dot in (dot1, dot2))
    s1 = h_TF if w1_scale is None else w1_scale.contiguous()  # placeholders when unscaled: never read
    s2 = y_TD if w2_scale is None else w2_scale.contiguous()
    pdl = pdl_launch(x_TD, n_tok)
    _decode_fc1_kernel[(n_exp, triton.cdiv(d_ff, c1["BF"]))](
        x_TD, w1_EFD, s1, expert_T, h_TF, n_tok, dim, d_ff,
        x_TD.stride(0), *w1_EFD.stride(), s1.stride(0), h_TF.stride(0),
        ACT=ACTIVATIONS[activation], ROUND=not flags["DOT_F32"] and dtype != torch.float32,
        HAS_SCALE=w1_scale is not None,
        BT=bt1, BF=c1["BF"], BK=c1["BK"], num_warps=c1["num_warps"], num_stages=c1["num_stages"], **flags,
        PDL=pdl, DOT=dot1, launch_pdl=pdl,
    )  # fmt: skip
    tiles_n = triton.cdiv(dim, c2["BN"])
    n_split, per = split_k(n_exp * tiles_n, d_ff, c2["BK"], _fc2_splits(n_tok) * n_exp * tiles_n)
    part = counters = y_TD  # placeholders: only read with SPLIT > 1
    if n_split > 1:
        part = torch.empty(n_split, n_tok, dim, dtype=torch.float32, device=x_TD.device)
        counters = split_k_counters(x_TD.device, n_exp * tiles_n)
    _decode_fc2_kernel[(n_exp, tiles_n, n_split)](
        h_TF, w2_EDF, s2, expert_T, gate_T.contiguous(), y_TD, part, counters, n_tok, dim, d_ff, per,
        h_TF.stride(0), *w2_EDF.stride(), s2.stride(0), y_TD.stride(0),
        HAS_SCALE=w2_scale is not None, SPLIT=n_split,
        BT=bt2, BN=c2["BN"], BK=c2["BK"], num_warps=c2["num_warps"], num_stages=c2["num_stages"], **flags,
        PDL=pdl, DOT=dot2, launch_pdl=pdl,
    )  # fmt: skip
    return y_TD if work == dtype else y_TD.to(dtype)


def decode_kernels_apply(x: Tensor, *tensors: Tensor) -> bool:
    """Whether an inference call on tokens ``x`` (..., D) takes the decode kernels: at most
    ``min(decode_tokens setting, MAX_TOKENS)`` tokens and :func:`route_kernels_apply`."""
    tokens = x.numel() // x.shape[-1] if x.ndim else 0
    return tokens <= min(get_settings().decode_tokens, MAX_TOKENS) and route_kernels_apply(x, *tensors)


def route_kernels_apply(x: Tensor, *tensors: Tensor) -> bool:
    """Whether an inference call on tokens ``x`` takes the routing kernels (one program per token, or per block
    of tokens past ROUTER_BLOCK_MIN_TOKENS, so any token count): the "triton" backend, no autograd through ``x``
    or ``tensors``, no autocast (:func:`.backend.inference_kernels_apply`)."""
    return inference_kernels_apply(x, *tensors)


def route_top1_ref(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor) -> tuple[Tensor, Tensor]:
    """Sigmoid top-1 routing: x (T, D) -> (expert (T,) int64, gate (T,) fp32) from fp32 logits; the lowest
    expert wins a tie of probabilities (as ``torch.max`` picks; see :mod:`blackmamba.routing.top1`)."""
    logits_TE = F.linear(x_TD.float(), weight_ED.float(), bias_E.float())
    gate_T, expert_T = torch.sigmoid(logits_TE).max(dim=-1)
    return expert_T, gate_T


def route_top1(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor) -> tuple[Tensor, Tensor]:
    """Sigmoid top-1 routing without autograd (a decode step, a prefill); see :func:`route_top1_ref`."""
    if route_kernels_apply(x_TD, weight_ED, bias_E):
        return route_top1_triton(x_TD, weight_ED, bias_E)
    return route_top1_ref(x_TD, weight_ED, bias_E)


def moe_experts_decode_ref(
    x_TD: Tensor,
    expert_T: Tensor,
    gate_T: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    activation: str = "gelu",
    *,
    w1_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
) -> Tensor:
    """The reference of the decode experts: :func:`.moe.moe_experts_ref`; with scales (float8 experts), on
    the weights dequantized in fp32 (W * s) and x in fp32, the result rounded to x's dtype."""
    if not _scaled(w1_EFD, w2_EDF, w1_scale, w2_scale):
        return moe_experts_ref(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
    _check_scales(x_TD, w1_EFD, w2_EDF, w1_scale, w2_scale)
    w1, w2 = dequantize(w1_EFD, w1_scale), dequantize(w2_EDF, w2_scale)
    return moe_experts_ref(x_TD.float(), expert_T, gate_T.float(), w1, w2, activation).to(x_TD.dtype)


def moe_experts_decode(
    x_TD: Tensor,
    expert_T: Tensor,
    gate_T: Tensor,
    w1_EFD: Tensor,
    w2_EDF: Tensor,
    activation: str = "gelu",
    *,
    w1_scale: Tensor | None = None,
    w2_scale: Tensor | None = None,
) -> Tensor:
    """The experts of a decode step: :func:`moe_experts_decode_triton` when the decode kernels apply, else
    :func:`.moe.moe_experts` (scaled float8 experts: :func:`.moe.moe_experts_fp8`). See
    :func:`moe_experts_decode_ref`."""
    if not _scaled(w1_EFD, w2_EDF, w1_scale, w2_scale):
        if x_TD.dtype == w1_EFD.dtype == w2_EDF.dtype and decode_kernels_apply(x_TD, gate_T, w1_EFD, w2_EDF):
            return moe_experts_decode_triton(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
        return moe_experts(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation)
    _check_scales(x_TD, w1_EFD, w2_EDF, w1_scale, w2_scale)
    if decode_kernels_apply(x_TD, gate_T):
        return moe_experts_decode_triton(
            x_TD, expert_T, gate_T, w1_EFD, w2_EDF, activation, w1_scale=w1_scale, w2_scale=w2_scale
        )
    return moe_experts_fp8(x_TD, expert_T, gate_T, w1_EFD, w2_EDF, w1_scale, w2_scale, activation)
