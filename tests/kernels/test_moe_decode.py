"""The decode-time MoE kernels (routing, fc1 + activation, fc2 + gate) against the reference path.

On the CPU they run in Triton's interpreter on tiny widths; the ``gpu`` tests use the 2.8B widths.
"""

import pytest
import torch
import torch.nn.functional as F

import blackmamba.kernels.moe as moe
from blackmamba.kernels import get_settings, moe_experts_fp8, moe_experts_ref, use_backend, use_settings
from blackmamba.kernels.moe_decode import (
    MAX_TOKENS,
    decode_tiles,
    moe_experts_decode,
    moe_experts_decode_ref,
    moe_experts_decode_triton,
    route_top1_triton,
)
from blackmamba.routing import top1_sigmoid

from ..helpers import DEVICE, ON_GPU, assert_close
from .test_moe import moe_inputs


def router_inputs(tokens, dim, experts, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g).to(device, dtype)
    w = (torch.randn(experts, dim, generator=g) / dim**0.5).to(device, dtype)
    b = (0.1 * torch.randn(experts, generator=g)).to(device, dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 100 and 150 tokens: past ROUTER_BLOCK_MIN_TOKENS, blocks of tokens on tl.dot (a partial last block; D = 70
# a partial last tile of the reduction).
@pytest.mark.parametrize("tokens,dim,experts", [(1, 24, 4), (5, 70, 3), (17, 64, 8), (100, 70, 8), (150, 40, 3)])
def test_route_top1_matches_reference(dtype, tokens, dim, experts):
    x, w, b = router_inputs(tokens, dim, experts, dtype)
    expert_ref, gate_ref = top1_sigmoid(F.linear(x.float(), w.float(), b.float()))
    expert, gate = route_top1_triton(x, w, b)
    assert expert.dtype == torch.long and gate.dtype == torch.float32
    assert torch.equal(expert, expert_ref)
    assert_close("gate", gate_ref, gate, "fp32_same_math")


def test_route_top1_ties_go_to_the_lowest_expert():
    # Saturated sigmoids are exactly 1.0 for experts 1 and 3: torch.max and the kernel both pick 1.
    x = torch.ones(2, 16, device=DEVICE)
    w = torch.zeros(4, 16, device=DEVICE)
    b = torch.tensor([0.0, 60.0, -3.0, 80.0], device=DEVICE)
    expert, gate = route_top1_triton(x, w, b)
    assert expert.tolist() == [1, 1] == top1_sigmoid(F.linear(x, w, b))[0].tolist()
    assert gate.tolist() == [1.0, 1.0]
    many = torch.ones(70, 16, device=DEVICE)  # the kernel over blocks of tokens
    expert, gate = route_top1_triton(many, w, b)
    assert expert.tolist() == [1] * 70 and gate.tolist() == [1.0] * 70


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("tokens,skew", [(1, False), (7, False), (23, True), (64, False)])
def test_experts_decode_matches_loop(poisoned, dtype, activation, tokens, skew):
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(tokens, 40, 36, 4, dtype, skew, seed=tokens))
    y_ref = moe_experts_ref(x, expert, gate, w1, w2, activation)
    y = moe_experts_decode_triton(x, expert, gate, w1, w2, activation)
    assert_close("y", y_ref, y, dtype)


def test_experts_decode_takes_strided_inputs(poisoned):
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(6, 32, 20, 3, torch.float32, False))
    x_wide = torch.randn(6, 64, device=DEVICE)
    x_wide[:, ::2] = x  # a view with column stride 2
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    y = moe_experts_decode_triton(x_wide[:, ::2], expert, gate, w1_t, w2_t, "gelu")
    assert_close("y", moe_experts_ref(x, expert, gate, w1, w2, "gelu"), y, torch.float32)


def test_experts_decode_rejects_bad_input():
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(4, 16, 8, 2, torch.float32, False))
    with pytest.raises(ValueError, match="at most"):
        big = MAX_TOKENS + 1
        moe_experts_decode_triton(x.new_zeros(big, 16), expert.new_zeros(big), gate.new_zeros(big), w1, w2)
    with pytest.raises(ValueError, match="activation"):
        moe_experts_decode_triton(x, expert, gate, w1, w2, "relu")
    with pytest.raises(ValueError, match="share a dtype"):
        moe_experts_decode_triton(x.double(), expert, gate, w1, w2)
    with pytest.raises(ValueError, match="weights"):
        moe_experts_decode_triton(x, expert, gate, w1[:, :, :8], w2)


def fp8_experts(dim, ff, experts, seed=0, device=DEVICE):
    """e4m3 experts (E, 2F, D) and (E, D, F) with fp32 scales per (expert, output channel)."""
    g = torch.Generator().manual_seed(seed)
    w1 = (4 * torch.randn(experts, 2 * ff, dim, generator=g)).to(torch.float8_e4m3fn).to(device)
    w2 = (4 * torch.randn(experts, dim, ff, generator=g)).to(torch.float8_e4m3fn).to(device)
    s1 = ((torch.rand(experts, 2 * ff, generator=g) + 0.5) / (4 * dim**0.5)).to(device)
    s2 = ((torch.rand(experts, dim, generator=g) + 0.5) / (4 * ff**0.5)).to(device)
    return w1, w2, s1, s2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,splits", [(1, 1), (1, 3), (7, 2), (23, 1)])
def test_experts_decode_fp8_matches_reference(poisoned, dtype, tokens, splits):
    x, expert, gate = (t.detach() for t in moe_inputs(tokens, 40, 100, 4, dtype, True, seed=tokens)[:3])
    w1, w2, s1, s2 = fp8_experts(40, 100, 4, seed=tokens)
    y_ref = moe_experts_decode_ref(x, expert, gate, w1, w2, "silu", w1_scale=s1, w2_scale=s2)
    with use_settings(moe_fc2_splits={64: splits}):
        y = moe_experts_decode_triton(x, expert, gate, w1, w2, "silu", w1_scale=s1, w2_scale=s2)
    assert_close("y", y_ref, y, dtype)


ONE_TOKEN_CUDA_CORES = dict(  # both decode kernels' single-token path (DOT=0) in the interpreter's tiles
    moe_fc1_tiles={1: dict(BF=16, BK=32, num_warps=4, num_stages=1, DOT=0), 64: dict(BF=16, BK=32, num_warps=4,
                                                                                     num_stages=1)},
    moe_fc2_tiles={1: dict(BN=16, BK=32, num_warps=4, num_stages=1, DOT=0), 64: dict(BN=16, BK=32, num_warps=4,
                                                                                     num_stages=1)},
)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
def test_one_token_on_the_cuda_cores(poisoned, dtype, activation, splits, fp8):
    """A single token with DOT=0 entries (D = 40, F = 100: partial tiles of BK 32 and BF/BN 16), fc2 in one
    or three splits, 16-bit/fp32 and float8 experts, against the reference; two tokens keep tl.dot."""
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(1, 40, 100, 4, dtype, False, seed=splits))
    scales = {}
    if fp8:
        w1, w2, s1, s2 = fp8_experts(40, 100, 4, seed=splits)
        scales = dict(w1_scale=s1, w2_scale=s2)
    y_ref = moe_experts_decode_ref(x, expert, gate, w1, w2, activation, **scales)
    tables = ONE_TOKEN_CUDA_CORES
    if fp8:
        tables = {"moe_fp8_fc1_tiles": tables["moe_fc1_tiles"], "moe_fp8_fc2_tiles": tables["moe_fc2_tiles"]}
    with use_settings(moe_fc2_splits={64: splits}, **tables):
        assert decode_tiles(1, dtype, fp8, False)[0]["DOT"] == 0 and decode_tiles(1, dtype, fp8, False)[1]["DOT"] == 0
        y = moe_experts_decode_triton(x, expert, gate, w1, w2, activation, **scales)
        assert_close("y", y_ref, y, dtype)
        x2, expert2, gate2 = x.expand(2, -1).contiguous(), expert.expand(2).contiguous(), gate.expand(2).contiguous()
        y2 = moe_experts_decode_triton(x2, expert2, gate2, w1, w2, activation, **scales)  # tl.dot
        assert_close("two tokens", moe_experts_decode_ref(x2, expert2, gate2, w1, w2, activation, **scales), y2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [70, pytest.param(150, marks=pytest.mark.slow)])  # 150: 10-12 s in the interpreter
def test_fp8_experts_past_the_decode_kernels(poisoned, monkeypatch, dtype, tokens):
    """More tokens than the decode kernels take: the grouped GEMMs read the float8 experts in place up to
    fp8_grouped_max_tokens, above it the experts are dequantized; both against the reference."""
    x, expert, gate = (t.detach() for t in moe_inputs(tokens, 40, 100, 4, dtype, True, seed=tokens)[:3])
    w1, w2, s1, s2 = fp8_experts(40, 100, 4, seed=tokens)
    y_ref = moe_experts_decode_ref(x, expert, gate, w1, w2, "gelu", w1_scale=s1, w2_scale=s2)
    weights = []
    launch = moe.grouped_gemm
    monkeypatch.setattr(
        moe, "grouped_gemm", lambda a, b, *args, **kw: weights.append(b.dtype) or launch(a, b, *args, **kw)
    )
    with use_backend("triton"):
        y = moe_experts_decode(x, expert, gate, w1, w2, "gelu", w1_scale=s1, w2_scale=s2)
        assert weights == [torch.float8_e4m3fn] * 2  # fc1 and fc2 on the float8 weights
        assert_close("grouped fp8", y_ref, y, dtype)
        with use_settings(fp8_grouped_max_tokens=tokens - 1):
            y_deq = moe_experts_fp8(x, expert, gate, w1, w2, s1, s2, "gelu")
        assert weights[2:] == [dtype] * 2  # the Triton grouped GEMMs (on the CPU) on dequantized experts
        assert_close("dequantized", y_ref, y_deq, dtype)


@pytest.mark.parametrize("splits", [2, 4])
def test_fc2_split_k_matches_one_split(poisoned, splits):
    """F = 100 in reduction steps of 32: fc2 runs 2 or 4 programs per column tile, the same result."""
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(9, 24, 100, 3, torch.float32, False, seed=splits))
    with use_settings(moe_fc2_splits={64: 1}):
        y_one = moe_experts_decode_triton(x, expert, gate, w1, w2)
    with use_settings(moe_fc2_splits={64: splits}):
        y = moe_experts_decode_triton(x, expert, gate, w1, w2)
        assert torch.equal(y, moe_experts_decode_triton(x, expert, gate, w1, w2))  # deterministic
    assert_close("y", moe_experts_ref(x, expert, gate, w1, w2), y, torch.float32)
    assert_close("y vs one split", y_one, y, "fp32_same_math")


def test_experts_decode_dispatches_fp8(poisoned):
    """The dispatcher: the kernels on the Triton backend, else the general path on dequantized experts."""
    x, expert, gate = (t.detach() for t in moe_inputs(5, 32, 20, 3, torch.bfloat16, False)[:3])
    w1, w2, s1, s2 = fp8_experts(32, 20, 3)
    y_ref = moe_experts_decode_ref(x, expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)
    for backend in ("triton", "torch", "ref"):
        with use_backend(backend):
            y = moe_experts_decode(x, expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)
        assert_close(backend, y_ref, y, torch.bfloat16)


def test_fp8_experts_take_their_own_tiles_where_set():
    bf16 = torch.bfloat16
    fc1_8, fc2_8 = dict(BF=16, BK=512, num_warps=8, num_stages=2), dict(BN=16, BK=1024, num_warps=8, num_stages=2)
    with use_settings(moe_fp8_fc1_tiles={}, moe_fp8_fc2_tiles={}):  # unset: the 16-bit tables
        assert decode_tiles(1, bf16, True, True) == decode_tiles(1, bf16, False, True)
    with use_settings(moe_fp8_fc1_tiles={1: fc1_8, 16: fc1_8}, moe_fp8_fc2_tiles={64: fc2_8}):
        fp8_tiles, dense_tiles = decode_tiles(3, bf16, True, True), decode_tiles(3, bf16, False, True)
        assert fp8_tiles == (fc1_8, fc2_8)
        assert dense_tiles == (dict(get_settings().moe_fc1_tiles[16]), dict(get_settings().moe_fc2_tiles[16]))


def test_experts_decode_rejects_bad_scales():
    x, expert, gate = (t.detach() for t in moe_inputs(4, 16, 8, 2, torch.bfloat16, False)[:3])
    w1, w2, s1, s2 = fp8_experts(16, 8, 2)
    with pytest.raises(ValueError, match="need both scales"):
        moe_experts_decode_triton(x, expert, gate, w1, w2, w1_scale=s1)
    with pytest.raises(ValueError, match="w2_scale must be"):
        moe_experts_decode(x, expert, gate, w1, w2, w1_scale=s1, w2_scale=s2[:, :4])
    with pytest.raises(ValueError, match="w1_scale must be"):
        moe_experts_decode_ref(x, expert, gate, w1, w2, w1_scale=s1.double(), w2_scale=s2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,splits", [(1, 1), (1, 4), (16, 1), (16, 2)])
def test_decode_moe_fp8_and_split_full_size(poisoned, tokens, splits):
    dim, ff, experts = 1472, 3872, 8
    inputs = moe_inputs(tokens, dim, ff, experts, torch.bfloat16, False, device="cuda")
    x, expert, gate, w1_bf, w2_bf = (t.detach() for t in inputs)
    w1, w2, s1, s2 = fp8_experts(dim, ff, experts, device="cuda")
    with use_settings(moe_fc2_splits={64: splits}):
        y8 = moe_experts_decode_triton(x, expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)
        y = moe_experts_decode_triton(x, expert, gate, w1_bf, w2_bf)
    y8_ref = moe_experts_decode_ref(x.float(), expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)
    assert_close("fp8", y8_ref, y8, torch.bfloat16, same_dtype=False)
    y_ref = moe_experts_ref(x.double(), expert, gate.double(), w1_bf.double(), w2_bf.double(), "gelu")
    assert_close("bf16", y_ref, y, torch.bfloat16, same_dtype=False)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
def test_fp8_experts_grouped_full_size(poisoned, tokens):
    """The 2.8B experts in float8 at a decode batch of 256 and a 2,048-token prefill (grouped GEMMs on the
    float8 weights), against the reference on the dequantized weights."""
    dim, ff, experts = 1472, 3872, 8
    x, expert, gate = (
        t.detach() for t in moe_inputs(tokens, dim, ff, experts, torch.bfloat16, True, device="cuda")[:3]
    )
    w1, w2, s1, s2 = fp8_experts(dim, ff, experts, device="cuda")
    with use_settings(fp8_grouped_max_tokens=4096):
        y8 = moe_experts_fp8(x, expert, gate, w1, w2, s1, s2, "gelu")
    y8_ref = moe_experts_decode_ref(x.float(), expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)
    assert_close("fp8 grouped", y8_ref, y8, torch.bfloat16, same_dtype=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_decode_moe_full_size(poisoned, dtype, tokens):
    dim, ff, experts = 1472, 3872, 8
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(tokens, dim, ff, experts, dtype, False, device="cuda"))
    rw, rb = router_inputs(tokens, dim, experts, dtype, device="cuda")[1:]
    expert, gate = route_top1_triton(x, rw, rb)
    expert_ref, gate_ref = top1_sigmoid(F.linear(x.float(), rw.float(), rb.float()))
    assert (expert != expert_ref).sum() <= 1  # summation order may flip a near-tie
    same = expert == expert_ref
    assert_close("gate", gate_ref[same], gate[same], torch.float32)
    y = moe_experts_decode_triton(x, expert, gate, w1, w2, "gelu")
    y_ref = moe_experts_ref(x.double(), expert, gate.double(), w1.double(), w2.double(), "gelu")
    assert_close("y", y_ref, y, dtype, same_dtype=False)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's rounding is checked on the CPU")
def test_interpreter_rounds_outputs_in_torch():
    # In the interpreter the kernels write fp32 and torch rounds: bf16 output equals the fp32 run rounded.
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(5, 32, 16, 2, torch.bfloat16, False))
    y = moe_experts_decode_triton(x, expert, gate, w1, w2)
    y32 = moe_experts_decode_triton(x.float(), expert, gate, w1.float(), w2.float())
    assert torch.equal(y, y32.to(torch.bfloat16))
