"""The causal depthwise conv and its decode step, every backend against the reference: the shifted PyTorch
path, the Triton kernels (forward, final state and every gradient) and the Triton decode-step kernel."""

import pytest
import torch

from blackmamba.kernels import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    conv_update,
    conv_update_triton,
    use_backend,
)
from blackmamba.kernels.causal_conv1d import (
    causal_conv1d_bwd_triton,
    causal_conv1d_fwd_triton,
    causal_conv1d_shifted,
)

from ..helpers import DEVICE, ON_GPU, assert_close, grad_tolerance, nan_filled
from .common import grads_of

STEPS = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length,dim,width", [(1, 5, 4), (3, 8, 4), (63, 13, 4), (20, 6, 2)])
def test_causal_conv_matches_reference(dtype, length, dim, width):
    torch.manual_seed(length)
    x = torch.randn(2, length, dim, dtype=dtype, requires_grad=True)
    w = torch.randn(dim, width, requires_grad=True)
    b = torch.randn(dim, requires_grad=True)
    state = torch.randn(2, width - 1, dim, dtype=dtype, requires_grad=True)
    for init in (None, state):
        y_ref, g_ref = grads_of(lambda x, w, b, s=init: causal_conv1d_ref(x, w, b, "silu", s), (x, w, b))
        y, g = grads_of(lambda x, w, b, s=init: causal_conv1d_shifted(x, w, b, "silu", s), (x, w, b))
        assert_close("y", y_ref, y, dtype)
        for name, a, r in zip(("dx", "dweight", "dbias"), g, g_ref, strict=True):
            assert_close(name, r, a, grad_tolerance(dtype))


def test_causal_conv_is_causal_and_final_state_is_last_inputs():
    x = torch.randn(1, 10, 4)
    w, b = torch.randn(4, 4), torch.randn(4)
    y, state = causal_conv1d(x, w, b, "silu", return_final_state=True)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 4)
    y2 = causal_conv1d(x2, w, b, "silu")
    assert_close("y before the change", y[:, :6], y2[:, :6], "exact")
    assert_close("final state", x[:, -3:], state, "exact")


def test_conv_update_steps_equal_the_sequence():
    x = torch.randn(3, 9, 5)
    w, b = torch.randn(5, 4), torch.randn(5)
    y_ref = causal_conv1d_ref(x, w, b, "silu")
    state = torch.zeros(3, 3, 5)
    ys = [causal_conv1d_update(x[:, t], state, w, b, "silu") for t in range(9)]
    assert_close("y", y_ref, torch.stack(ys, 1), "fp32_same_math")
    assert_close("window", x[:, -3:], state, "exact")


def conv_inputs(batch, length, dim, width, dtype, strided, w_dtype=torch.float32, device=DEVICE, seed=0):
    """Random x (a column slice of a wider tensor when ``strided``, as ``in_proj(u).chunk(2, -1)[0]``),
    weight, bias and initial state, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, length, 2 * dim if strided else dim, generator=g).to(device, dtype)
    x = wide[..., :dim].requires_grad_() if not strided else wide.requires_grad_()[..., :dim]
    w = (torch.randn(dim, width, generator=g) * 0.5).to(device, w_dtype).requires_grad_()
    b = torch.randn(dim, generator=g).to(device, w_dtype).requires_grad_()
    s = torch.randn(batch, width - 1, dim, generator=g).to(device, dtype).requires_grad_()
    return x, w, b, s


def run_with_grads(fn, x, w, b, act, s, seed=1):
    """Output, final state and the grads of a random projection of both w.r.t. (x, w, b[, s])."""
    y, final = fn(x, w, b, act, s, True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    gf = torch.randn(final.shape, generator=g).to(y.device, final.dtype)
    loss = (y.float() * gy.float()).sum() + (final.float() * gf.float()).sum()
    inputs = (x, w, b) if s is None else (x, w, b, s)
    return y, final, torch.autograd.grad(loss, inputs)


def check_triton(x, w, b, act, s, dtype):
    with use_backend("triton"):
        y, final, grads = run_with_grads(causal_conv1d, x, w, b, act, s)
    assert type(y.grad_fn).__name__ == "CausalConv1dTritonBackward"
    y_ref, final_ref, grads_ref = run_with_grads(causal_conv1d_ref, x, w, b, act, s)
    assert_close("y", y_ref, y, dtype)
    assert_close("final state", final_ref, final, "exact")
    for name, a, r in zip(("dx", "dweight", "dbias", "dstate")[: len(grads)], grads, grads_ref, strict=True):
        assert_close(name, r, a, grad_tolerance(dtype))


CASES = [  # batch, length, dim, width, activation, strided x
    (1, 1, 5, 4, "silu", True),
    (7, 3, 13, 4, None, False),
    (2, 63, 13, 4, "silu", True),
    (2, 20, 6, 2, None, True),
    (1, 9, 8, 3, "silu", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,length,dim,width,act,strided", CASES)
def test_triton_conv_matches_reference(dtype, batch, length, dim, width, act, strided):
    x, w, b, s = conv_inputs(batch, length, dim, width, dtype, strided, seed=length)
    for init in (None, s):
        check_triton(x, w, b, act, init, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", None])
def test_triton_conv_launchers_write_every_element(dtype, act):
    """Small blocks, so the halo crosses tile edges along L and D is ragged; outputs start as NaN; weight and
    bias in x's dtype."""
    batch, length, dim, width = 2, 37, 13, 4
    x, w, b, s = conv_inputs(batch, length, dim, width, dtype, strided=True, w_dtype=dtype, seed=3)
    blocks = dict(block_l=16, block_d=8, num_warps=1)
    y = causal_conv1d_fwd_triton(x, w, b, act, s, out=nan_filled((batch, length, dim), dtype), **blocks)
    dy = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    dx, ds, dw, db = causal_conv1d_bwd_triton(
        x, w, b, act, s, dy,
        dx=nan_filled((batch, length, dim), dtype), dinitial_state=nan_filled((batch, width - 1, dim), dtype),
        **blocks,
    )  # fmt: skip
    y_ref = causal_conv1d_ref(x, w, b, act, s)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b, s), dy)
    assert_close("y", y_ref, y, dtype)
    for name, a, r in zip(("dx", "dweight", "dbias", "dstate"), (dx, dw, db, ds), grads_ref, strict=True):
        assert_close(name, r, a, grad_tolerance(dtype))


def test_triton_conv_without_bias_or_state_grad():
    x, w, _, s = conv_inputs(3, 11, 6, 4, torch.float32, strided=False, seed=7)
    s = s.detach()
    with use_backend("triton"):
        y = causal_conv1d(x, w, None, "silu", s)
    y_ref = causal_conv1d_ref(x, w, None, "silu", s)
    dy = torch.randn_like(y)
    assert_close("y", y_ref, y, torch.float32)
    grads, grads_ref = torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy)
    for name, a, r in zip(("dx", "dweight"), grads, grads_ref, strict=True):
        assert_close(name, r, a, torch.float32)


def test_triton_conv_rejects_bad_arguments():
    x, w, b, _ = conv_inputs(1, 4, 8, 4, torch.float32, strided=False)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_fwd_triton(x, w, b, "gelu")
    with pytest.raises(ValueError, match="powers of two"):
        causal_conv1d_fwd_triton(x, w, b, block_l=48)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_fwd_triton(x, w, b, initial_state=torch.randn(1, 2, 8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("with_state", [False, True])
def test_triton_conv_full_size_gpu(with_state):
    x, w, b, s = conv_inputs(8, 2048, 2944, 4, torch.bfloat16, strided=True, device="cuda")
    check_triton(x, w, b, "silu", s if with_state else None, torch.bfloat16)


def conv_step_inputs(batch, dim, width, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # x as the first half of an in_proj output, like the mixer's strided view
    xz = torch.randn(STEPS, batch, 2 * dim, generator=g).to(device, dtype)
    state = torch.randn(batch, width - 1, dim, generator=g).to(device, dtype)
    w, b = torch.randn(dim, width, generator=g).to(device), torch.randn(dim, generator=g).to(device)
    return xz[..., :dim], state, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,width", [(1, 13, 4), (7, 64, 4), (7, 13, 2)])
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
def test_conv_update_matches_reference(dtype, batch, dim, width, bias, activation):
    xs, state, w, b = conv_step_inputs(batch, dim, width, dtype)
    b = b if bias else None
    ref_state = state.clone()
    for x in xs:  # consecutive steps carry the window
        y_ref = causal_conv1d_update(x, ref_state, w, b, activation)
        with use_backend("triton"):
            y = conv_update_triton(x, state, w, b, activation, out=nan_filled((batch, dim), dtype))
        assert_close("y", y_ref, y, dtype)
        assert_close("window", ref_state, state, "exact")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_update_steps_the_windows_of_its_slots(backend, dtype):
    """Row b of a step shifts window ``state_indices[b]`` of a pool exactly as a window of its own would
    shift; the windows of other slots stay as they were."""
    xs, _, w, b = conv_step_inputs(3, 13, 4, dtype)
    pool = torch.randn(5, 3, 13, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    slots = torch.tensor([3, 0, 4], device=DEVICE)
    own, others = pool[slots].clone(), pool[[1, 2]].clone()
    for x in xs:
        y_own = causal_conv1d_update(x, own, w, b, "silu")
        with use_backend(backend):
            y = conv_update(x, pool, w, b, "silu", slots)
        assert_close("y", y_own, y, dtype)
        assert_close("windows of the slots", own, pool[slots], "exact")
    assert torch.equal(pool[[1, 2]], others)
    with pytest.raises(ValueError, match="state_indices"), use_backend("triton"):
        conv_update_triton(xs[0], pool, w, b, "silu", slots[:2])
