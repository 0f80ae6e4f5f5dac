"""Linear layers for a few rows at a time (decode): y = x W^T, W (N, K) as ``nn.Linear`` stores it.

A decode step multiplies 1-16 rows by each weight matrix once, so a projection costs the time to read its
weights: the three of a 2.8B Mamba block are 27 MB of bf16, 6.4 us at the H200's copy bandwidth, where
cuBLAS takes 19 us (issue 17). The kernel here streams W with many bytes in flight:

* One program per (BN output columns, K range, BM rows). One row multiplies and adds on the CUDA cores
  into a (BN, BK) fp32 tile summed once at the end, loading each weight tile one step ahead; more rows use
  ``tl.dot`` with the rows padded to 16. Tiles come from the ``gemv_tiles`` setting by row count, or from
  ``gemv_shape_tiles`` for the weight shapes swept there (the Mamba projections of the released models).
* With PDL (the ``pdl_max_rows`` setting, sm_90) the first weight tile is read before the kernel waits for
  the one before it (:func:`.tl_math.pdl_wait`): with a BK that covers the program's K range, all its weight
  bytes are in flight while the previous kernel finishes.
* Split-K when the column tiles alone would leave SMs idle (a narrow W such as x_proj's 124 rows, or
  out_proj's 1472 with 16-row tiles). It is deterministic and takes one launch: each program writes its
  fp32 partial sum and bumps its tile's counter; the program that arrives last adds the partials in split
  order (fixed, so the result does not depend on which one arrives last), writes y and resets the counter
  for the next launch. The counters live in one zeroed buffer per device (:func:`split_k_counters`).
* Weight-only fp8: ``float8_e4m3fn`` weights with per-output-channel fp32 scales, y = x (s * W8)^T. Tiles
  are converted to x's dtype in registers (exact: every e4m3 value is a bf16 and an fp16 value) and the
  scale multiplies the fp32 accumulator once per column: sum_k x_k (s W8_k) = s sum_k x_k W8_k.

:func:`linear` is the public op: the kernel where it applies (backend "triton", at most the
``gemv_max_rows`` setting's rows, no autograd, no autocast; for unquantised weights only with the
``gemv_dense`` setting on), else :func:`linear_reference` (backend "ref") or ``F.linear`` (scaled weights
dequantized to x's dtype first: how a prefill of many rows runs them). The kernel accumulates in fp32 and
rounds y once to x's dtype; in Triton's interpreter, whose float casts truncate, it writes fp32 and torch
rounds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BlackMambaError
from .backend import inference_kernels_apply, resolve_backend
from .causal_conv1d import check_conv_step, conv_update
from .settings import get_settings
from .tl_math import count_key, pdl_launch, pdl_wait, round_to_bf16

try:
    import triton
    import triton.language as tl

    from .causal_conv1d import conv_window_step

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched

    def _jit(fn):
        return fn


FP8 = (torch.float8_e4m3fn,)
DENSE = (torch.bfloat16, torch.float16, torch.float32)
MAX_ROW_BLOCK = 64  # rows of one program; more rows take more program rows (each reads W again)
MAX_SPLIT = 32
COUNTERS = 4096  # split-K tiles one launch may count (the counter buffer's length)


class GemvError(BlackMambaError, ValueError):
    """Arguments of :func:`linear` that do not fit together (shapes, dtypes, a missing fp8 scale)."""


@_jit
def split_k_arrive(acc, part_ptr, offs, mask, stride_split, pid_k, count_ptr):
    """Store this program's fp32 partial (split ``pid_k``) and count it in at its tile's counter; returns
    the count before this program's (SPLIT - 1 for the one that arrives last)."""
    tl.store(part_ptr + pid_k.to(tl.int64) * stride_split + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's part is written before the count moves (CUTLASS's semaphore order)
    return tl.atomic_add(count_ptr, 1, sem="acq_rel")


@_jit
def split_k_total(part_ptr, offs, mask, stride_split, count_ptr, SPLIT: tl.constexpr):
    """The sum of the SPLIT partials of a tile in split order, read by the program that arrived last, which
    then resets the tile's counter for the next launch. ``.cg`` loads read L2, where the others wrote."""
    total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, SPLIT):
        total += tl.load(part_ptr + s * stride_split + offs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.atomic_xchg(count_ptr, 0)
    return total


@_jit
def one_row_products(w, w_ptrs, x_ptrs, x_ok, n_ok, k_lo, k_hi, stride_w_k,
                     BN: tl.constexpr, BK: tl.constexpr, ACC_K: tl.constexpr):  # fmt: skip
    """One row x times BN weight rows on the CUDA cores: the (1, BN) fp32 sums over K in [k_lo, k_hi). ``w`` is
    the first (BN, BK) weight tile, already loaded (callers read it before their PDL wait); each next tile is
    loaded a step ahead. ``x_ok`` (1, 1) masks the row. The accumulator is (BN, ACC_K): ACC_K = BK sums over
    K once, at the end; ACC_K = 1 sums each step's products at once. The GEMV's one row and the decode MoE's
    one-token fc2 (:mod:`.moe_decode`)."""
    ks = tl.arange(0, BK)
    acc_k = tl.zeros((BN, ACC_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        x = tl.load(x_ptrs, mask=x_ok & (ks < k_hi - k0)[None, :], other=0.0)
        w_ptrs += BK * stride_w_k
        w_next = tl.load(w_ptrs, mask=n_ok[:, None] & (ks < k_hi - k0 - BK)[None, :], other=0.0)
        if ACC_K == 1:
            acc_k += tl.sum(w.to(tl.float32) * x.to(tl.float32), 1, keep_dims=True)
        else:
            acc_k += w.to(tl.float32) * x.to(tl.float32)
        w = w_next
        x_ptrs += BK
    return tl.sum(acc_k, 1)[None, :]


@_jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    part_ptr,
    count_ptr,
    conv_state_ptr,
    conv_w_ptr,
    conv_b_ptr,
    slots_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_x_m,
    stride_w_n,
    stride_w_k,
    d_conv,
    stride_cs_b,
    stride_cs_k,
    stride_cs_d,
    stride_cw_d,
    stride_cw_k,
    HAS_SCALE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ACC_K: tl.constexpr,
    CONV: tl.constexpr,
    CONV_K: tl.constexpr,
    CONV_BIAS: tl.constexpr,
    CONV_SILU: tl.constexpr,
    CONV_SLOTS: tl.constexpr,
    CONV_RNE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    m_ok = ms < M
    n_ok = ns < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + ms[:, None].to(tl.int64) * stride_x_m + (k_lo + ks)[None, :]
    w_ptrs = w_ptr + ns[:, None].to(tl.int64) * stride_w_n + (k_lo + ks)[None, :].to(tl.int64) * stride_w_k
    if BM == 1:  # one row: products on the CUDA cores, one reduction over K at the end
        # The weight tile of the next step is loaded one step ahead, the first before the PDL wait (weights
        # are parameters): with a BK that covers the program's K range, all its weight bytes are in flight
        # while the kernel before finishes. The fp32 accumulator is (BN, ACC_K): ACC_K = BK sums over K once, at
        # the end; ACC_K = 1 sums each step's products at once (fewer registers for deep tiles, more reductions).
        w = tl.load(w_ptrs, mask=n_ok[:, None] & (ks < k_hi - k_lo)[None, :], other=0.0)
        pdl_wait(PDL)
        row_ok = tl.full((1, 1), 1, tl.int1)  # a one-row program's row always exists
        acc = one_row_products(w, w_ptrs, x_ptrs, row_ok, n_ok, k_lo, k_hi, stride_w_k, BN, BK, ACC_K)
    else:
        pdl_wait(PDL)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            k_ok = ks < k_hi - k0
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                x, w = x.to(tl.float32), w.to(tl.float32)
            else:
                w = w.to(x.dtype)  # fp8 -> x's dtype is exact; a no-op for x's own dtype
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            x_ptrs += BK
            w_ptrs += BK * stride_w_k
    offs = ms[:, None].to(tl.int64) * N + ns[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT > 1:
        count_ptr += pid_m * tl.num_programs(0) + pid_n
        if split_k_arrive(acc, part_ptr, offs, mask, M * N, pid_k, count_ptr) != SPLIT - 1:
            return
        acc = split_k_total(part_ptr, offs, mask, M * N, count_ptr, SPLIT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + ns, mask=n_ok, other=0.0)[None, :]
    if CONV:
        if pid_n * BN < d_conv:  # a tile with conv channels (the x half of in_proj)
            acc = _conv_epilogue(acc, ms, ns, m_ok, n_ok, y_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, slots_ptr,
                                 d_conv, stride_cs_b, stride_cs_k, stride_cs_d, stride_cw_d, stride_cw_k, BM, BN,
                                 CONV_K, CONV_BIAS, CONV_SILU, CONV_SLOTS, CONV_RNE)  # fmt: skip
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _conv_epilogue(acc, ms, ns, m_ok, n_ok, y_ptr, state_ptr, w_ptr, bias_ptr, slots_ptr, d_conv,
                   stride_s_b, stride_s_k, stride_s_d, stride_w_d, stride_w_k,
                   BM: tl.constexpr, BN: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SILU: tl.constexpr, HAS_SLOTS: tl.constexpr, RNE: tl.constexpr):  # fmt: skip
    """The decode conv step on the GEMV's output columns below ``d_conv``: each is rounded to y's dtype as the
    unfused step stores it, enters its row's conv window (row m's window is slots[m], or m), and is replaced by
    act(conv); the other columns pass through. :func:`.causal_conv1d.conv_window_step` does the step. RNE: y
    is fp32 here (Triton's interpreter) for bf16 inputs: rounded to bf16 by hand, as the interpreter's cast
    would truncate."""
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + ms, mask=m_ok, other=0).to(tl.int64)
    else:
        slot = ms.to(tl.int64)
    cols = ns[None, :] + tl.zeros((BM, BN), tl.int32)  # every pointer a full (BM, BN) tile, as the mask is
    conv_col = cols < d_conv
    cmask = m_ok[:, None] & n_ok[None, :] & conv_col
    x_new = round_to_bf16(acc) if RNE else acc
    x_new = x_new.to(y_ptr.dtype.element_ty).to(state_ptr.dtype.element_ty)
    out = conv_window_step(
        x_new, state_ptr + slot[:, None] * stride_s_b + cols * stride_s_d, w_ptr + cols * stride_w_d,
        bias_ptr + cols, cmask, stride_s_k, stride_w_k, K, HAS_BIAS, SILU,
    )  # fmt: skip
    return tl.where(conv_col, out, acc)


_counters: dict[torch.device, Tensor] = {}


def split_k_counters(device: torch.device, tiles: int) -> Tensor:
    """Zeroed int32 counters for ``tiles`` split-K tiles on ``device``; the kernels leave them zeroed.

    One buffer per device, made on first use outside a CUDA-graph capture. During a capture without one,
    a buffer of the call's own is made (its zeroing is captured with the graph) and not kept, since it is
    zeroed only when the graph replays. Launches on one stream run in order, so they can share the buffer;
    split-K launches running at the same time on two streams of one device would not (nothing here does).
    """
    if tiles > COUNTERS:
        raise ValueError(f"split_k_counters: {tiles} tiles, more than the {COUNTERS} counters")
    buf = _counters.get(device)
    if buf is None:
        buf = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return buf
        _counters[device] = buf
    return buf


def split_k(tiles: int, k: int, block_k: int, target: int) -> tuple[int, int]:
    """(splits, elements of K per split): enough splits that ``tiles * splits`` reaches ``target`` programs,
    each split a whole number of ``block_k`` steps, at most :data:`MAX_SPLIT`; one split when the tiles
    alone reach the target or would not fit the counters."""
    want = min(_cdiv(target, max(tiles, 1)), _cdiv(k, block_k), MAX_SPLIT)
    if want <= 1 or tiles > COUNTERS:
        return 1, max(k, 1)
    per = _cdiv(_cdiv(k, want), block_k) * block_k
    return _cdiv(k, per), per


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _programs_target(x: Tensor) -> int:
    """Programs a launch should have: the ``gemv_programs_per_sm`` setting times the SMs; 8 in Triton's
    interpreter, so that tiny test shapes split too."""
    if not x.is_cuda:
        return 8
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return get_settings().gemv_programs_per_sm * sms


_INTERPRETED = {1: dict(BN=4, BK=32, num_warps=1, num_stages=1), 16: dict(BN=16, BK=32, num_warps=4, num_stages=1)}


def _config(
    table: Mapping[int, Mapping[str, int]],
    rows: int,
    dtype: torch.dtype,
    x_dtype: torch.dtype,
    on_gpu: bool,
    shape: tuple[int, int] | None = None,
    shape_table: Mapping[tuple[int, int, int], Mapping[str, int]] | None = None,
    fp8_table: Mapping[tuple[int, int, int], Mapping[str, int]] | None = None,
) -> dict:
    """Tiles for ``rows``: the ``gemv_tiles`` entry of the smallest row count >= rows (else the largest),
    or the ``gemv_shape_tiles`` entry of that row count and the weight's ``shape`` (N, K) where there is
    one (for float8 weights, first the ``gemv_fp8_shape_tiles`` entry, taken as it is), with ``DOT`` set:
    one row takes the CUDA-core path (any BN) unless its entry has DOT=1, more rows ``tl.dot`` (BN >= 16).
    The 16-bit tables are for 16-bit weights and x: fp32 takes twice the shared memory, so its reduction
    step is capped; float8 weights on tl.dot take a step twice as deep, the same bytes per tile (on the CUDA
    cores the step stays: the fp32 accumulator, not the tile, sets the registers there)."""
    key = count_key(table, rows)
    cfg = dict(table[key])
    fp8_entry = None
    if shape is not None:
        if dtype in FP8 and fp8_table:
            fp8_entry = fp8_table.get((key, *shape))
        if shape_table:
            cfg = dict(shape_table.get((key, *shape), cfg))
    cfg = dict(fp8_entry or cfg)
    dot = int(rows > 1 or bool(cfg.get("DOT", 0)))
    if not on_gpu:  # tiny tiles: the interpreter runs every program on the CPU
        return dict(_INTERPRETED[16 if dot else 1], DOT=dot, ACC_K=cfg.get("ACC_K", 0))
    cfg["DOT"] = dot
    if cfg["DOT"]:
        cfg["BN"] = max(cfg["BN"], 16)
    if torch.float32 in (dtype, x_dtype):
        cfg = {**cfg, "BK": min(cfg["BK"], 128), "num_stages": min(cfg["num_stages"], 3)}
    elif dtype in FP8 and fp8_entry is None and dot:
        cfg["BK"] *= 2
    return cfg


def _check(x: Tensor, weight: Tensor, scale: Tensor | None) -> None:
    if weight.ndim != 2:
        raise GemvError(f"linear: weight must be (N, K); got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise GemvError(f"linear: x must be (..., {k}) for a weight of shape {(n, k)}; got {tuple(x.shape)}")
    if x.dtype not in DENSE:
        raise GemvError(f"linear: x must be bf16, fp16 or fp32; got {x.dtype}")
    if weight.dtype in FP8:
        if scale is None:
            raise GemvError("linear: float8 weights need their per-output-channel scales (scale=...)")
    elif weight.dtype != x.dtype:
        raise GemvError(f"linear: x and weight must share a dtype unless the weight is float8; got {x.dtype}, "
                        f"{weight.dtype}")  # fmt: skip
    if scale is not None and (scale.shape != (n,) or scale.dtype != torch.float32):
        raise GemvError(f"linear: scale must be ({n},) float32; got {tuple(scale.shape)} {scale.dtype}")


def dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``weight`` (..., N, K) times its per-row ``scale`` (..., N), computed in fp32, rounded once to
    ``dtype``; without a scale, the weight in ``dtype``."""
    if scale is None:
        return weight.to(dtype)
    return (weight.float() * scale.float()[..., None]).to(dtype)


def linear_reference(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """y = x (scale * W)^T: x (..., K), weight (N, K), scale (N,) fp32 or None -> (..., N) in x's dtype.

    Unquantised weights without a scale: ``F.linear(x, weight)``. Otherwise the weights are dequantized to
    fp32 and the product taken in fp32, then rounded to x's dtype. float8 weights need a scale."""
    if scale is None and weight.dtype not in FP8:
        return F.linear(x, weight)
    _check(x, weight, scale)
    return F.linear(x.float(), dequantize(weight, scale)).to(x.dtype)


def _linear_torch(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    """:func:`linear_reference` on the fast torch ops: scaled weights are dequantized to x's dtype (one
    rounding each) for one ``F.linear`` in that dtype, as a prefill of many rows would run them."""
    if scale is None and weight.dtype not in FP8:
        return F.linear(x, weight)
    _check(x, weight, scale)
    return F.linear(x, dequantize(weight, scale, x.dtype))


def launch_plan(x_MK: Tensor, weight: Tensor, splits: int | None = None) -> dict:
    """How :func:`linear_triton` launches for x (M, K) and weight (N, K): the tiles of :func:`_config` and
    BM (rows per program), SPLIT, k_per_split, tiles_n, tiles_m and programs."""
    (m, k), n = x_MK.shape, weight.shape[0]
    settings = get_settings()
    cfg = _config(settings.gemv_tiles, m, weight.dtype, x_MK.dtype, x_MK.is_cuda, tuple(weight.shape),
                  settings.gemv_shape_tiles, settings.gemv_fp8_shape_tiles)  # fmt: skip
    bm = min(MAX_ROW_BLOCK, max(16, triton.next_power_of_2(m))) if cfg["DOT"] else 1
    tiles = triton.cdiv(n, cfg["BN"]) * triton.cdiv(m, bm)
    target = _programs_target(x_MK) if splits is None else splits * tiles
    n_split, per = split_k(tiles, k, cfg["BK"], target)
    return dict(cfg, BM=bm, SPLIT=n_split, k_per_split=per, tiles_n=triton.cdiv(n, cfg["BN"]),
                tiles_m=triton.cdiv(m, bm), programs=tiles * n_split)  # fmt: skip


def linear_triton(x: Tensor, weight: Tensor, scale: Tensor | None = None, splits: int | None = None) -> Tensor:
    """:func:`linear_reference` in one Triton launch, no autograd. ``splits`` forces the number of K
    ranges (rounded to whole tiles; None: enough to fill the GPU, see :func:`split_k`)."""
    _check(x, weight, scale)
    n, k = weight.shape
    x_MK = x.reshape(-1, k)
    return _launch(x_MK, weight, scale, splits).view(*x.shape[:-1], n)


def linear_conv_triton(
    x: Tensor,
    weight: Tensor,
    conv_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None = None,
    scale: Tensor | None = None,
    activation: str | None = "silu",
    state_indices: Tensor | None = None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """y = x (scale * W)^T for x (B, K), then the decode conv step on y's first D columns, in the same
    launch: (act(conv(y[:, :D])) (B, D), y[:, D:]), the windows ``conv_state`` (S, W-1, D) shifted in place,
    as :func:`linear_triton` followed by :func:`.causal_conv1d.conv_update_triton` on y[:, :D] give them
    (conv_weight (D, W), conv_bias (D,), row b on window ``state_indices[b]``). The Mamba decode step's
    in_proj and conv: one launch less per layer."""
    op = "linear_conv"
    _check(x, weight, scale)
    if x.ndim != 2:
        raise GemvError(f"{op}: x must be (B, K); got {tuple(x.shape)}")
    batch, n, dim = x.shape[0], weight.shape[0], conv_weight.shape[0] if conv_weight.ndim else 0
    check_conv_step(op, batch, dim, conv_state, conv_weight, conv_bias, activation, state_indices, "conv_", GemvError)
    if not 0 < dim <= n:
        raise GemvError(f"{op}: the conv's {dim} channels must be among the weight's {n} outputs")
    conv = (conv_state, conv_weight, conv_bias, state_indices, activation == "silu")
    y = _launch(x, weight, scale, splits, conv)
    return y[:, :dim], y[:, dim:]


def _launch(
    x_MK: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    splits: int | None,
    conv: tuple[Tensor, Tensor, Tensor | None, Tensor | None, bool] | None = None,
) -> Tensor:
    """The GEMV launch of :func:`linear_triton` for x (M, K) (checked), with the conv epilogue of
    :func:`linear_conv_triton` when ``conv`` = (state, weight, bias, state indices, silu) is given."""
    n, k = weight.shape
    if x_MK.stride(-1) != 1:
        x_MK = x_MK.contiguous()
    m = x_MK.shape[0]
    interpreted = not x_MK.is_cuda
    work = torch.float32 if interpreted else x_MK.dtype  # the interpreter's casts truncate: torch rounds
    if m == 0 or n == 0:
        return x_MK.new_zeros(m, n)
    cfg = launch_plan(x_MK, weight, splits)
    bm, n_split, per, tiles_n, tiles_m = cfg["BM"], cfg["SPLIT"], cfg["k_per_split"], cfg["tiles_n"], cfg["tiles_m"]
    y = torch.empty(m, n, dtype=work, device=x_MK.device)
    part = counters = y  # placeholders: only read with SPLIT > 1
    if n_split > 1:
        part = torch.empty(n_split, m, n, dtype=torch.float32, device=x_MK.device)
        counters = split_k_counters(x_MK.device, tiles_n * tiles_m)
    if conv is None:
        c_state = c_weight = c_bias = c_slots = y  # placeholders: only read with CONV
        c_strides, d_conv, width, c_flags = (0,) * 5, 0, 1, (False, False, False, False)
    else:
        c_state, c_weight, c_bias, c_slots, silu = conv
        c_strides, d_conv, width = (*c_state.stride(), *c_weight.stride()), c_weight.shape[0], c_weight.shape[1]
        c_flags = (c_bias is not None, silu, c_slots is not None, interpreted and x_MK.dtype == torch.bfloat16)
        c_bias = y if c_bias is None else c_bias.contiguous()
        c_slots = y if c_slots is None else c_slots
    tf32 = x_MK.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted
    pdl = pdl_launch(x_MK, m)
    _gemv_kernel[(tiles_n, n_split, tiles_m)](
        x_MK, weight, y if scale is None else scale, y, part, counters, c_state, c_weight, c_bias, c_slots,
        m, n, k, per, x_MK.stride(0), weight.stride(0), weight.stride(1), d_conv, *c_strides,
        HAS_SCALE=scale is not None, SPLIT=n_split, DOT_F32=interpreted and x_MK.dtype != torch.float32,
        PRECISION="tf32" if tf32 else "ieee", PDL=pdl, BM=bm, BN=cfg["BN"], BK=cfg["BK"], ACC_K=_acc_k(cfg, bm),
        CONV=conv is not None, CONV_K=width, CONV_BIAS=c_flags[0], CONV_SILU=c_flags[1], CONV_SLOTS=c_flags[2],
        CONV_RNE=c_flags[3],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
    return y.to(x_MK.dtype)


def _acc_k(cfg: Mapping[str, int], bm: int) -> int:
    """The one-row accumulator's width (the kernel's ACC_K): 1 where the entry says ACC_K=1, else BK; 0 on
    tl.dot, which has none."""
    if bm > 1:
        return 0
    return 1 if cfg.get("ACC_K", 0) == 1 else cfg["BK"]


def gemv_applies(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> bool:
    """Whether :func:`linear` takes the Triton kernel: the "triton" backend, at most ``gemv_max_rows``
    rows (``gemv_fp8_max_rows`` for float8 weights), unquantised weights only with ``gemv_dense`` and in
    x's dtype, no autograd through the inputs, no autocast."""
    settings = get_settings()
    rows = x.numel() // max(x.shape[-1], 1) if x.ndim else 0
    quantised = weight.dtype in FP8 or scale is not None
    return (
        0 < rows <= (settings.gemv_fp8_max_rows if weight.dtype in FP8 else settings.gemv_max_rows)
        and (quantised or (settings.gemv_dense and weight.dtype == x.dtype))
        and x.dtype in DENSE
        and inference_kernels_apply(x, weight)
    )


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """y = x (scale * W)^T: x (..., K), weight (N, K) (bf16, fp16, fp32 in x's dtype, or float8_e4m3fn with
    ``scale``), scale (N,) fp32 per output channel or None -> (..., N) in x's dtype. The few-row Triton
    kernel where :func:`gemv_applies`, else :func:`linear_reference` (backend "ref") or its fast torch twin."""
    if gemv_applies(x, weight, scale):
        return linear_triton(x, weight, scale)
    if resolve_backend(x, has_triton=True) == "ref":
        return linear_reference(x, weight, scale)
    return _linear_torch(x, weight, scale)


def linear_conv(
    x: Tensor,
    weight: Tensor,
    conv_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None = None,
    scale: Tensor | None = None,
    activation: str | None = "silu",
    state_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The decode step's in_proj and conv: y = :func:`linear` (x, weight, scale) for x (B, K), then
    (act(conv(y[:, :D])), y[:, D:]) with the conv windows (S, W-1, D) shifted in place. One Triton launch
    (:func:`linear_conv_triton`) where :func:`gemv_applies` and the ``gemv_conv`` setting is on; else
    :func:`linear` and :func:`.causal_conv1d.conv_update`."""
    if get_settings().gemv_conv and x.ndim == 2 and gemv_applies(x, weight, scale):
        return linear_conv_triton(x, weight, conv_state, conv_weight, conv_bias, scale, activation, state_indices)
    y = linear(x, weight, scale)
    dim = conv_weight.shape[0]
    return conv_update(y[..., :dim], conv_state, conv_weight, conv_bias, activation, state_indices), y[..., dim:]
