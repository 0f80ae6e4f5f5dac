"""The numerical helpers shared by the Triton kernels."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from blackmamba.kernels.tl_math import count_key, round_to_bf16, softplus

from ..helpers import DEVICE


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, softplus(tl.load(x_ptr + i)))


def test_kernel_softplus_is_accurate_for_negative_inputs():
    """dt = softplus(raw) with raw near -7 is common; log(1 + exp(raw)) would lose 1e-4 of it on the GPU."""
    x = torch.linspace(-30, 40, 1024, device=DEVICE)
    y = torch.empty_like(x)
    _softplus_kernel[(1,)](x, y, N=1024)
    ref = F.softplus(x.double())
    # Per element, not assert_close: a norm over the tensor would not see the tiny outputs this is about.
    assert ((y.double() - ref) / ref).abs().max() < 2e-6


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, round_to_bf16(tl.load(x_ptr + i)))


def test_round_to_bf16_is_torchs_rounding():
    """Random fp32 values over many magnitudes, negatives, exact bf16 values and ties (both parities of the
    kept bit) round as torch's cast does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(832, generator=g) * torch.logspace(-20, 20, 832)  # 1024 values in all
    bits = torch.randint(0, 2**15, (64,), generator=g, dtype=torch.int32) << 16
    ties = (bits | 0x8000).view(torch.float32)  # halfway between two bf16 values
    x = torch.cat([x, ties, ties.bfloat16().float(), -ties]).to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, N=x.numel())
    assert torch.equal(y, x.bfloat16().float())


def test_count_key_takes_the_smallest_key_that_covers_the_count_else_the_largest():
    table = {16: "b", 1: "a", 64: "c"}
    assert [count_key(table, n) for n in (1, 2, 16, 17, 64, 65, 1000)] == [1, 16, 16, 64, 64, 64, 64]
