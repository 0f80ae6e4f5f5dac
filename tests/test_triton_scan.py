"""The Triton selective scan against the sequential reference: forward, final state and every gradient.

On a CPU the kernels run in Triton's interpreter on tiny shapes with a chunk of 8 positions (so several
chunks and a ragged last one are covered); the gpu-marked tests run the real chunk size at full shapes.
"""

import importlib

import pytest
import torch

from blackmamba.kernels import selective_scan, use_backend
from blackmamba.kernels.selective_scan import selective_scan_ref, selective_scan_triton

from .conftest import DEVICE, TOL, rel_err

pytest.importorskip("triton")
scan_mod = importlib.import_module("blackmamba.kernels.selective_scan")


def scan_inputs(batch, length, d_in, n, dtype, device=DEVICE, seed=0, with_state=True):
    """Random inputs shaped as in the model: B and C are strided views of one projection, z a half of another."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    proj = rand(batch, length, 3 + 2 * n).to(dtype)
    return {
        "u": rand(batch, length, d_in).to(dtype),
        "delta": rand(batch, length, d_in, scale=0.5).to(dtype),
        "A": -(0.1 + 3 * torch.rand(d_in, n, generator=g)).to(device),
        "B": proj[..., 3 : 3 + n],
        "C": proj[..., 3 + n :],
        "D": rand(d_in),
        "z": rand(batch, length, 2 * d_in).to(dtype)[..., d_in:],
        "delta_bias": (torch.rand(d_in, generator=g) * 4 - 5).to(device),
        "initial_state": rand(batch, d_in, n) if with_state else None,
    }


def run(fn, inputs, seed=1):
    """y, final state and the gradients of a random linear function of both, for every input tensor."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y, h = fn(**leaves, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g).to(y.device)
    wh = torch.randn(h.shape, generator=g).to(h.device)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad((y.float() * wy).sum() + (h * wh).sum(), [leaves[k] for k in names])
    return y, h, dict(zip(names, grads, strict=True))


def check(inputs, dtype):
    rtol, atol = TOL[dtype]
    y, h, grads = run(selective_scan_triton, inputs)
    y_ref, h_ref, grads_ref = run(selective_scan_ref, inputs)
    assert not y.isnan().any() and not h.isnan().any()
    if dtype == torch.float32:
        # The GPU's exp2 is approximate (2 ulp): over thousands of steps elementwise errors reach ~1e-5.
        assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
    else:
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(h, h_ref, rtol=rtol, atol=atol)
    for name, ref in grads_ref.items():
        assert not grads[name].isnan().any(), name
        # Relative to the gradient's size: sums over the batch and sequence grow with the shape.
        assert rel_err(grads[name], ref) < (1e-5 if dtype == torch.float32 else 2e-2), name


@pytest.fixture
def small_chunks(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setattr(scan_mod, "SCAN_CHUNK", 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,length,d_in,n", [(2, 19, 13, 4), (1, 1, 5, 16), (1, 8, 3, 3)])
def test_triton_scan_matches_reference(poisoned, small_chunks, dtype, batch, length, d_in, n):
    check(scan_inputs(batch, length, d_in, n, dtype), dtype)


@pytest.mark.parametrize("segments", [2, 3])
def test_triton_scan_sequence_segments(poisoned, small_chunks, monkeypatch, segments):
    """The forward split over the sequence (two passes and a carry across segments) changes nothing."""
    monkeypatch.setattr(scan_mod, "SCAN_SEGMENTS", segments)
    check(scan_inputs(2, 21, 5, 4, torch.float32), torch.float32)
    check(scan_inputs(1, 17, 3, 2, torch.float32, with_state=False), torch.float32)


def test_triton_scan_with_bc_tiles(poisoned, small_chunks, monkeypatch):
    """The forward variant that loads B and C per group as tiles."""
    monkeypatch.setattr(scan_mod, "SCAN_BC_TILES", True)
    check(scan_inputs(2, 19, 13, 4, torch.bfloat16), torch.bfloat16)
    check(scan_inputs(1, 21, 5, 16, torch.float32), torch.float32)


def test_triton_scan_without_optional_inputs(poisoned, small_chunks):
    inputs = scan_inputs(2, 11, 6, 4, torch.float32, with_state=False)
    inputs.update(D=None, z=None, delta_bias=None)
    y, h, grads = run(lambda **kw: selective_scan_triton(**kw, delta_softplus=False), inputs)
    y_ref, h_ref, grads_ref = run(lambda **kw: selective_scan_ref(**kw, delta_softplus=False), inputs)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5)


def test_public_op_routes_to_triton(small_chunks):
    inputs = scan_inputs(1, 5, 4, 2, torch.float32)
    with torch.no_grad():
        with use_backend("triton"):
            y = selective_scan(**inputs)
        torch.testing.assert_close(y, selective_scan_ref(**inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("segments", ["auto", 1, 4])
def test_triton_scan_segments_full_shape(poisoned, monkeypatch, segments):
    monkeypatch.setattr(scan_mod, "SCAN_SEGMENTS", segments)
    check(scan_inputs(1, 2048, 2944, 16, torch.float32, device=torch.device("cuda")), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,length,d_in", [(1, 1, 2944), (7, 63, 100), (1, 500, 2944), (2, 2048, 2944), (7, 2048, 200)]
)
def test_triton_scan_full_shapes(poisoned, dtype, batch, length, d_in):
    check(scan_inputs(batch, length, d_in, 16, dtype, device=torch.device("cuda")), dtype)
