"""Causal conv, RMSNorm and MoE experts: fast paths against their references, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from blackmamba.kernels import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    moe_experts,
    moe_experts_ref,
    rms_norm_ref,
    use_backend,
)
from blackmamba.kernels.causal_conv1d import causal_conv1d_shifted
from blackmamba.kernels.moe import gated_activation, moe_experts_sorted

from .conftest import TOL


def grads_of(fn, inputs):
    out = fn(*inputs)
    if isinstance(out, tuple):
        out = out[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return out, torch.autograd.grad((out * weight).float().sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length,dim,width", [(1, 5, 4), (3, 8, 4), (63, 13, 4), (20, 6, 2)])
def test_causal_conv_matches_reference(dtype, length, dim, width):
    torch.manual_seed(length)
    x = torch.randn(2, length, dim, dtype=dtype, requires_grad=True)
    w = torch.randn(dim, width, requires_grad=True)
    b = torch.randn(dim, requires_grad=True)
    state = torch.randn(2, width - 1, dim, dtype=dtype, requires_grad=True)
    rtol, atol = TOL[dtype]
    for init in (None, state):
        y_ref, g_ref = grads_of(lambda x, w, b, s=init: causal_conv1d_ref(x, w, b, "silu", s), (x, w, b))
        y, g = grads_of(lambda x, w, b, s=init: causal_conv1d_shifted(x, w, b, "silu", s), (x, w, b))
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
        for a, r in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a.float(), r.float(), rtol=rtol * 5, atol=atol * 5)


def test_causal_conv_is_causal_and_final_state_is_last_inputs():
    x = torch.randn(1, 10, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    y, state = causal_conv1d(x, w, b, "silu", return_final_state=True)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 4)
    y2 = causal_conv1d(x2, w, b, "silu")
    torch.testing.assert_close(y[:, :6], y2[:, :6], rtol=0, atol=0)
    torch.testing.assert_close(state, x[:, -3:], rtol=0, atol=0)


def test_conv_update_steps_equal_the_sequence():
    x = torch.randn(3, 9, 5)
    w, b = torch.randn(5, 4), torch.randn(5)
    y_ref = causal_conv1d_ref(x, w, b, "silu")
    state = torch.zeros(3, 3, 5)
    ys = [causal_conv1d_update(x[:, t], state, w, b, "silu") for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, x[:, -3:], rtol=0, atol=0)


def test_rms_norm_definition():
    x = torch.randn(4, 7) * 3
    w = torch.randn(7)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-5), expected)


def moe_inputs(tokens, dim, ff, experts, dtype, skew=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g).to(dtype).requires_grad_()
    if skew:  # most tokens to expert 0, some experts get none
        expert = torch.where(torch.rand(tokens, generator=g) < 0.8, 0, experts - 1)
    else:
        expert = torch.randint(0, experts, (tokens,), generator=g)
    gate = torch.rand(tokens, generator=g).to(dtype).requires_grad_()
    w1 = (torch.randn(experts, 2 * ff, dim, generator=g) / dim**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(experts, dim, ff, generator=g) / ff**0.5).to(dtype).requires_grad_()
    return x, expert, gate, w1, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,skew", [(1, False), (37, False), (200, True), (64, False)])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_moe_sorted_matches_loop(dtype, tokens, skew, activation):
    x, expert, gate, w1, w2 = moe_inputs(tokens, 12, 20, 5, dtype, skew=skew, seed=tokens)
    inputs = (x, gate, w1, w2)
    y_ref, g_ref = grads_of(lambda x, g, a, b: moe_experts_ref(x, expert, g, a, b, activation), inputs)
    y, g = grads_of(lambda x, g, a, b: moe_experts_sorted(x, expert, g, a, b, activation), inputs)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.float(), r.float(), rtol=rtol * 5, atol=atol * 5)


def test_moe_one_expert_equals_dense_gated_mlp():
    x, _, gate, w1, w2 = moe_inputs(30, 8, 16, 1, torch.float32)
    expert = torch.zeros(30, dtype=torch.long)
    dense = (F.gelu(x @ w1[0, :16].t()) * (x @ w1[0, 16:].t())) @ w2[0].t() * gate[:, None]
    torch.testing.assert_close(moe_experts(x, expert, gate, w1, w2, "gelu"), dense, rtol=1e-5, atol=1e-5)


def test_gated_activation_halves():
    h = torch.randn(3, 10)
    torch.testing.assert_close(gated_activation(h, "silu"), F.silu(h[:, :5]) * h[:, 5:])
    with pytest.raises(ValueError, match="activation"):
        gated_activation(h, "relu")


def test_backend_switch_selects_reference():
    x, expert, gate, w1, w2 = moe_inputs(10, 4, 6, 3, torch.float32)
    calls = []
    import blackmamba.kernels.moe as moe_mod

    original = moe_mod.moe_experts_ref
    moe_mod.moe_experts_ref = lambda *a: calls.append(1) or original(*a)
    try:
        with use_backend("ref"):
            moe_mod.moe_experts(x, expert, gate, w1, w2)
        moe_mod.moe_experts(x, expert, gate, w1, w2)
    finally:
        moe_mod.moe_experts_ref = original
    assert calls == [1]
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("cuda-magic"):
            pass
