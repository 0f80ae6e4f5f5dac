"""The decode-time MoE kernels (routing, fc1 + activation, fc2 + gate) against the reference path.

On the CPU they run in Triton's interpreter on tiny widths; the ``gpu`` tests use the 2.8B widths.
"""

import pytest
import torch
import torch.nn.functional as F

from blackmamba.kernels import moe_experts_ref
from blackmamba.kernels.moe_decode import MAX_TOKENS, moe_experts_decode_triton, route_top1_triton
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
@pytest.mark.parametrize("tokens,dim,experts", [(1, 24, 4), (5, 70, 3), (17, 64, 8)])
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
