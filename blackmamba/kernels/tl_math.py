"""Small helpers shared by the Triton kernels (numerics) and by their launchers (launch shapes, checks)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .settings import get_settings

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched

    def _jit(fn):
        return fn


ACTIVATIONS = {"gelu": 0, "silu": 1, "gelu_tanh": 2}  # the MoE activations, numbered for the kernels


@_jit
def softplus(x):
    """log(1 + exp(x)) in fp32, torch's softplus (x above 20 passes through), accurate for negative x too.

    ``log(1 + e)`` loses e's low digits when 1 + e rounds, and the GPU's fast log adds an absolute error of
    about 1e-7: at x = -7 (dt = 1e-3, a common Mamba step) that is a relative error of 1e-4 in dt. Below
    e = 0.1 the series of log1p, to e^7, is used instead (relative truncation error below 2e-8).
    """
    e = tl.exp(tl.minimum(x, 20.0))
    s = tl.minimum(e, 0.1)  # the series is only kept below 0.1; capped so that it never overflows
    series = s * (1.0 + s * (-0.5 + s * (1.0 / 3.0 + s * (-0.25 + s * (0.2 + s * (-1.0 / 6.0 + s / 7.0))))))
    return tl.where(x > 20.0, x, tl.where(e < 0.1, series, tl.log(1.0 + e)))


@_jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still fp32: what the GPU's cast to bf16
    gives. For Triton's interpreter, whose float casts truncate; finite inputs only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@_jit
def top1_sigmoid(logits, e_ok, E_P2: tl.constexpr):
    """(expert, gate) of one token from its router logits (E_P2,) fp32, ``e_ok`` masking the padded
    experts: gate = the largest sigmoid, expert = its lowest index on ties (as ``torch.max`` picks)."""
    e = tl.arange(0, E_P2)
    probs = tl.where(e_ok, tl.sigmoid(logits), -1.0)
    best = tl.max(probs, 0)
    return tl.min(tl.where(probs == best, e, E_P2), 0), best


@_jit
def gated(a, b, ACT: tl.constexpr, ROUND: tl.constexpr, dtype: tl.constexpr):
    """act(a) * b in fp32 for the activation numbered ACT in ACTIVATIONS; with ROUND, a, b and act(a) are
    rounded to ``dtype`` first, as the reference stores h and act(a) in the experts' dtype."""
    if ROUND:  # h = x W1^T is stored in the experts' dtype in the reference
        a = a.to(dtype).to(tl.float32)
        b = b.to(dtype).to(tl.float32)
    if ACT == 0:
        act = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 1:
        act = a * tl.sigmoid(a)
    else:  # tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        act = a * tl.sigmoid(2.0 * u)
    if ROUND:
        act = act.to(dtype).to(tl.float32)
    return act * b


@_jit
def pdl_wait(PDL: tl.constexpr):
    """With PDL (a programmatic dependent launch, sm_90+): wait until the kernel before this one in the
    stream has finished and its writes are visible, then let the next kernel launch. Everything a kernel
    does before this call may only read what no earlier kernel of the step writes (its parameters), so
    that reading overlaps the previous kernel; reads of activations, decode state and any write come after.
    The next kernel is released only here, after the wait, so at most two kernels overlap. A no-op
    without PDL (and the interpreter, which has no inline assembly, never sets it)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_launch(t: Tensor, rows: int) -> bool:
    """Whether a decode kernel of ``rows`` rows (tokens) on ``t``'s device launches with PDL: at most the
    ``pdl_max_rows`` setting's rows, a CUDA tensor and a GPU of compute capability 9.0 or later (Hopper)."""
    if not (0 < rows <= get_settings().pdl_max_rows and t.is_cuda):
        return False
    return _has_pdl(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _has_pdl(device_index: int) -> bool:
    """Compute capability 9.0 or later (asked once per device: a decode step launches hundreds of kernels)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


# Host side: launch shape and checks shared by the decode-step kernels (conv_update, ssm_update).
# At least DECODE_MIN_PROGRAMS programs (about one per SM of an H100/H200) so that batch 1 still spreads over
# the GPU; tiles of at most DECODE_MAX_TILE elements so registers stay small for any N.
DECODE_MIN_PROGRAMS = 128
DECODE_MAX_TILE = 4096


def count_key(table: Mapping[int, Any], count: int) -> int:
    """The key of a tile table (settings keyed by a row or token count) that serves ``count``: the smallest
    key >= count, else the largest."""
    fits = [n for n in table if n >= count]
    return min(fits) if fits else max(table)


def decode_launch_config(batch: int, dim: int, row: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for tiles of BLOCK_D rows of ``row`` elements over ``dim`` channels."""
    block = min(128, triton.next_power_of_2(dim), max(1, DECODE_MAX_TILE // row))
    while block > 16 and batch * triton.cdiv(dim, block) < DECODE_MIN_PROGRAMS:
        block //= 2
    return block, max(1, min(8, block * row // 512))


def expect_shape(op: str, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must be {shape}, got {tuple(t.shape)}")


def check_state_indices(op: str, state_indices: Tensor | None, batch: int, device: torch.device) -> None:
    """Slot indices of a decode step: (B,) int32 or int64 on the inputs' device. Their range is the caller's
    contract (checking it would read the indices back to the host, which a CUDA graph cannot hold)."""
    if state_indices is None:
        return
    if state_indices.shape != (batch,) or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: state_indices must be ({batch},) int32 or int64, got {tuple(state_indices.shape)} "
            f"{state_indices.dtype}"
        )
    if state_indices.device != device:
        raise ValueError(f"{op}: state_indices must be on {device}, got {state_indices.device}")
