"""RMSNorm with the fused residual add, and the norm + router decode op: the Triton kernels against their
references, forward and every gradient."""

import pytest
import torch

from blackmamba.kernels import (
    add_rms_norm,
    add_rms_norm_ref,
    add_rms_norm_route,
    add_rms_norm_route_ref,
    rms_norm,
    rms_norm_ref,
    use_backend,
)

from ..helpers import DEVICE, ON_GPU, assert_close, grad_tolerance

pytest.importorskip("triton")


def test_rms_norm_definition():
    x = torch.randn(4, 7) * 3
    w = torch.randn(7)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    assert_close("rms_norm_ref", expected, rms_norm_ref(x, w, 1e-5), "fp32_same_math")


SHAPES = [(7, 13), (1, 5), (3, 4, 33), (1, 63, 24)] if not ON_GPU else [(7, 13), (1, 5), (3, 63, 1472), (8, 2560)]


def norm_inputs(shape, weight_dtype, delta_dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g)).to(device).requires_grad_()
    delta = None
    if delta_dtype is not None:
        delta = torch.randn(shape, generator=g).to(device, delta_dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(device, weight_dtype).requires_grad_()
    return x, delta, weight


def outputs_and_grads(fn, inputs, use_y=True, use_r=True, seed=1):
    """Both outputs of ``fn`` and the gradients of a random linear function of them."""
    y, r = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.device)
    gr = torch.randn(r.shape, generator=g).to(r.device)
    # An output left out of the loss gets no gradient at all (None in the backward), as in a real graph.
    loss = sum(((y.float() * gy).sum(),) * use_y + ((r * gr).sum(),) * use_r)
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    return (y, r), torch.autograd.grad(loss, wrt, allow_unused=True)


def check(fn, ref, inputs, tol_dtype, **kw):
    (y, r), grads = outputs_and_grads(fn, inputs, **kw)
    (y_ref, r_ref), grads_ref = outputs_and_grads(ref, inputs, **kw)
    assert_close("y", y_ref, y, tol_dtype)
    assert_close("residual", r_ref, r, torch.float32)
    for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(f"grad {i}", b, a, grad_tolerance(tol_dtype))


def triton_add_rms_norm(x, delta, weight):
    with use_backend("triton"):
        return add_rms_norm(x, delta, weight, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16, None])
def test_add_rms_norm_matches_reference(poisoned, shape, weight_dtype, delta_dtype):
    inputs = norm_inputs(shape, weight_dtype, delta_dtype, seed=len(shape) + shape[-1])
    # The reference rounds the gradient through rr to bf16 too, so bf16 anywhere sets the tolerance.
    tol_dtype = torch.bfloat16 if torch.bfloat16 in (weight_dtype, delta_dtype) else torch.float32
    check(triton_add_rms_norm, lambda x, d, w: add_rms_norm_ref(x, d, w, 1e-5), inputs, tol_dtype)


@pytest.mark.parametrize("use_y,use_r", [(True, False), (False, True)])
def test_add_rms_norm_one_output_used(poisoned, use_y, use_r):
    x, delta, weight = norm_inputs((5, 19), torch.bfloat16, torch.bfloat16)
    delta.requires_grad_(False)
    ref = lambda x, d, w: add_rms_norm_ref(x, d, w, 1e-5)  # noqa: E731
    check(triton_add_rms_norm, ref, (x, delta, weight), torch.bfloat16, use_y=use_y, use_r=use_r)


@pytest.mark.parametrize("shape", [(7, 13), (1, 5), (3, 4, 33)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_triton_matches_reference(poisoned, shape, x_dtype, weight_dtype):
    x, _, weight = norm_inputs(shape, weight_dtype, None, seed=shape[-1])
    x = x.detach().to(x_dtype).requires_grad_()

    def fast(x, w):
        with use_backend("triton"):
            y = rms_norm(x, w, 1e-5)
        return y, y.new_zeros(())

    ref = lambda x, w: (rms_norm_ref(x, w, 1e-5), x.new_zeros(()))  # noqa: E731
    check(fast, ref, (x, weight), torch.bfloat16 if torch.bfloat16 in (x_dtype, weight_dtype) else torch.float32)


def test_add_rms_norm_without_delta_returns_the_residual():
    x, _, weight = norm_inputs((4, 9), torch.bfloat16, None)
    with use_backend("triton"):
        _, r = add_rms_norm(x, None, weight)
    assert r.dtype == torch.float32 and torch.equal(r, x)


def test_add_rms_norm_backends_agree_outside_triton():
    x, delta, weight = norm_inputs((3, 8), torch.bfloat16, torch.bfloat16)
    y_ref, r_ref = add_rms_norm_ref(x, delta, weight)
    for name in ("ref", "auto"):
        with use_backend(name):
            y, r = add_rms_norm(x, delta, weight)
        assert torch.equal(y, y_ref) and torch.equal(r, r_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1472, 2560])
def test_add_rms_norm_full_size_on_gpu(width):
    inputs = norm_inputs((8 * 2048, width), torch.bfloat16, torch.bfloat16, device="cuda")
    (y, r), grads = outputs_and_grads(triton_add_rms_norm, inputs)
    (y_ref, r_ref), grads_ref = outputs_and_grads(lambda x, d, w: add_rms_norm_ref(x, d, w, 1e-5), inputs)
    assert not y.isnan().any() and not any(g.isnan().any() for g in grads)
    assert_close("residual", r_ref, r, "exact")
    assert_close("y", y_ref, y, torch.bfloat16)
    for name, a, b in zip(("dx", "ddelta", "dweight"), grads, grads_ref, strict=True):
        assert_close(name, b, a, torch.bfloat16)


# (3, 40, 24): 120 rows, past the decode kernels' 64 tokens (the routing kernels take any count)
ROUTE_SHAPES = [((1, 24), 3), ((5, 100), 8), ((2, 3, 33), 5), ((3, 40, 24), 8)]


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,experts", ROUTE_SHAPES + ([((64, 1472), 8)] if ON_GPU else []))
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_route_matches_reference(poisoned, weight_dtype, shape, experts, with_delta):
    x, delta, weight = (
        t if t is None else t.detach() for t in norm_inputs(shape, weight_dtype, weight_dtype if with_delta else None)
    )
    g = torch.Generator().manual_seed(7)
    rw = (torch.randn(experts, shape[-1], generator=g) / shape[-1] ** 0.5).to(DEVICE, weight_dtype)
    rb = (0.1 * torch.randn(experts, generator=g)).to(DEVICE, weight_dtype)
    y_ref, r_ref, _, _ = add_rms_norm_route_ref(x, delta, weight, 1e-5, rw, rb)
    with use_backend("triton"):
        y, r, expert, gate = add_rms_norm_route(x, delta, weight, 1e-5, rw, rb)
    assert_close("y", y_ref, y, weight_dtype)
    assert_close("residual", r_ref, r, "fp32_same_math")
    # Routing of the row the kernel stored (the interpreter's casts truncate where the GPU rounds)
    logits = torch.nn.functional.linear(y.reshape(-1, shape[-1]).float(), rw.float(), rb.float())
    gate_ref, expert_ref = torch.sigmoid(logits).max(-1)
    assert expert.dtype == torch.long and gate.dtype == torch.float32
    assert torch.equal(expert, expert_ref)
    assert_close("gate", gate_ref, gate, "fp32_same_math")


def test_add_rms_norm_route_ties_and_bad_shapes():
    x = torch.randn(2, 16, device=DEVICE)
    weight = torch.ones(16, device=DEVICE)
    rw = torch.zeros(4, 16, device=DEVICE)
    rb = torch.tensor([0.0, 60.0, -3.0, 80.0], device=DEVICE)  # sigmoid saturates to 1.0 for experts 1 and 3
    with use_backend("triton"):
        _, _, expert, gate = add_rms_norm_route(x, None, weight, 1e-5, rw, rb)
        assert expert.tolist() == [1, 1] and gate.tolist() == [1.0, 1.0]
        with pytest.raises(ValueError, match="router weight"):
            add_rms_norm_route(x, None, weight, 1e-5, rw[:, :8], rb)
