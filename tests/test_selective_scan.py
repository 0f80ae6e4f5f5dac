import importlib

import pytest
import torch

from blackmamba.kernels import selective_scan_chunked, selective_scan_ref, selective_state_update

from .conftest import rel_err


def make_inputs(batch, length, d_inner, n, dtype, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).requires_grad_()

    return dict(
        u=r(batch, length, d_inner),
        delta=r(batch, length, d_inner, scale=0.5, shift=-1.0),
        A=(-torch.rand(d_inner, n, generator=g) * 4 - 0.1).requires_grad_(),
        B=r(batch, length, n),
        C=r(batch, length, n),
        D=torch.randn(d_inner, generator=g).requires_grad_(),
        z=r(batch, length, d_inner),
        delta_bias=(torch.randn(d_inner, generator=g) * 0.5).requires_grad_(),
        initial_state=torch.randn(batch, d_inner, n, generator=g).requires_grad_() if with_state else None,
    )


def run(fn, inp, **kw):
    return fn(
        inp["u"],
        inp["delta"],
        inp["A"],
        inp["B"],
        inp["C"],
        inp["D"],
        inp["z"],
        inp["delta_bias"],
        True,
        inp["initial_state"],
        True,
        **kw,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 3, 63, 300])
@pytest.mark.parametrize("batch,d_inner,n", [(2, 12, 5), (1, 7, 16)])
def test_chunked_matches_reference_forward_and_backward(dtype, length, batch, d_inner, n):
    inp = make_inputs(batch, length, d_inner, n, dtype, seed=length)
    y_ref, h_ref = run(selective_scan_ref, inp)
    grads_ref = torch.autograd.grad((y_ref.float() ** 2).sum() + (h_ref**2).sum(), list(v for v in inp.values()))
    y, h = run(selective_scan_chunked, inp)
    grads = torch.autograd.grad((y.float() ** 2).sum() + (h**2).sum(), list(v for v in inp.values()))
    assert y.dtype == dtype and h.dtype == torch.float32
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(y, y_ref) < rtol
    assert rel_err(h, h_ref) < rtol
    for name, g, g_ref in zip(inp, grads, grads_ref, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, g_ref) < (1e-4 if dtype == torch.float32 else 2e-2), name


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    inp = make_inputs(2, 50, 9, 4, torch.float32)
    y_ref, h_ref = run(selective_scan_ref, inp)
    y, h = run(selective_scan_chunked, inp, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_scan_in_pieces_equals_whole():
    inp = make_inputs(2, 40, 6, 4, torch.float32, with_state=False)
    args = [inp[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y_all, h_all = selective_scan_chunked(*args, True, None, True)
    first = [a[:, :17] if a.ndim == 3 else a for a in args]
    second = [a[:, 17:] if a.ndim == 3 else a for a in args]
    y1, h1 = selective_scan_chunked(*first, True, None, True)
    y2, h2 = selective_scan_chunked(*second, True, h1, True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h_all, rtol=1e-5, atol=1e-5)


def test_state_update_steps_equal_the_scan():
    inp = make_inputs(3, 20, 8, 4, torch.float32)
    args = {k: v.detach() for k, v in inp.items()}
    y_ref, h_ref = run(selective_scan_ref, args)
    state = args["initial_state"].clone()
    ys = []
    for t in range(20):
        ys.append(
            selective_state_update(
                state,
                args["u"][:, t],
                args["delta"][:, t],
                args["A"],
                args["B"][:, t],
                args["C"][:, t],
                args["D"],
                args["z"][:, t],
                args["delta_bias"],
            )
        )
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, h_ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    inp = make_inputs(2, 5, 4, 3, torch.float32, with_state=False)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_chunked(inp["u"], inp["delta"], inp["A"], inp["B"][:, :4], inp["C"])
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan_chunked(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], initial_state=torch.ones(1))


@pytest.mark.parametrize("length", [1, 3, 63, 300])
@pytest.mark.parametrize("block_elems", [1, 2**20])
def test_inference_path_matches_reference(monkeypatch, length, block_elems):
    """Under no_grad the scan takes the in-place, channel-blocked path; it must equal the reference."""
    ss = importlib.import_module("blackmamba.kernels.selective_scan")
    monkeypatch.setattr(ss, "_INPLACE_BLOCK_ELEMS", block_elems)
    inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(3, length, 21, 6, torch.float32).items()}
    y_ref, h_ref = run(selective_scan_ref, inp)
    with torch.no_grad():
        y, h = run(selective_scan_chunked, inp)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
