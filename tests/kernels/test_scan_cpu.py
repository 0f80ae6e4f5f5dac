"""The compiled CPU scan (kernels/scan_cpu.py) against the sequential reference, forward and every gradient,
and its place in the dispatcher: the default on CPU tensors, off with the setting, and the PyTorch path in its
place (with a warning, never an error) when the library cannot be built.

Tests of the compiled kernel skip only where no C++ compiler exists; a compiler that fails to build the file
fails them. They share one build per process (about a second).
"""

import warnings

import pytest
import torch

from blackmamba.kernels import scan_cpu, selective_scan, selective_scan_ref, use_backend, use_settings
from blackmamba.kernels.scan_cpu import selective_scan_cpu

from ..helpers import assert_close, grad_tolerance

needs_compiler = pytest.mark.skipif(
    scan_cpu.find_compiler() is None, reason="no C++ compiler (c++, g++ or clang++; or $CXX) to build the CPU scan"
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, length, d_inner, n, dtype, seed=0, with_state=True, optional=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).requires_grad_()

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_() if optional else None

    return dict(
        u=r(batch, length, d_inner),
        delta=r(batch, length, d_inner, scale=0.5, shift=-1.0),
        A=(-torch.rand(d_inner, n, generator=g) * 4 - 0.1).requires_grad_(),
        B=r(batch, length, n),
        C=r(batch, length, n),
        D=param(d_inner),
        z=r(batch, length, d_inner) if optional else None,
        delta_bias=param(d_inner, scale=0.5),
        initial_state=torch.randn(batch, d_inner, n, generator=g).requires_grad_() if with_state else None,
    )


def run(fn, inp, softplus=True):
    return fn(*(inp[k] for k in NAMES[:8]), softplus, inp["initial_state"], True)


def loss_and_grads(fn, inp, softplus=True):
    y, h = run(fn, inp, softplus)
    leaves = [v for v in inp.values() if v is not None]
    return y, h, torch.autograd.grad((y.float() ** 2).sum() + (h**2).sum(), leaves)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,length,d_inner,n",
    [(2, 1, 7, 16), (2, 63, 37, 5), (1, 300, 40, 16), (1, 5, 64, 4)],  # L=1, odd L, widths around the 32-lane block
)
def test_compiled_matches_reference_forward_and_backward(poisoned, dtype, batch, length, d_inner, n):
    inp = make_inputs(batch, length, d_inner, n, dtype, seed=length)
    y_ref, h_ref, g_ref = loss_and_grads(selective_scan_ref, inp)
    y, h, grads = loss_and_grads(selective_scan_cpu, inp)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert_close("y", y_ref, y, dtype)
    assert_close("final state", h_ref, h, torch.float32)
    names = [k for k, v in inp.items() if v is not None]
    for name, a, b, leaf in zip(names, g_ref, grads, inp.values(), strict=True):
        assert b.dtype == leaf.dtype, name
        assert_close(f"d{name}", a, b, grad_tolerance(leaf.dtype))


@needs_compiler
@pytest.mark.parametrize("softplus", [True, False])
def test_compiled_without_optional_inputs(poisoned, softplus):
    inp = make_inputs(2, 17, 33, 8, torch.float32, seed=5, with_state=False, optional=False)
    if not softplus:  # dt is used as given: keep it positive
        inp["delta"] = inp["delta"].detach().abs().requires_grad_()
    y_ref, h_ref, g_ref = loss_and_grads(selective_scan_ref, inp, softplus)
    y, h, grads = loss_and_grads(selective_scan_cpu, inp, softplus)
    assert_close("y", y_ref, y, torch.float32)
    assert_close("final state", h_ref, h, torch.float32)
    for name, a, b in zip([k for k, v in inp.items() if v is not None], g_ref, grads, strict=True):
        assert_close(f"d{name}", a, b, torch.float32)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_reads_strided_views_like_the_layer(poisoned, dtype):
    """The Mamba layer passes z as half of in_proj's output and B, C as slices of x_proj's: column views."""
    g = torch.Generator().manual_seed(7)
    batch, length, d_inner, n = 2, 9, 35, 6
    xz = torch.randn(batch, length, 2 * d_inner, generator=g).to(dtype)
    dbc = torch.randn(batch, length, 3 + 2 * n, generator=g).to(dtype)
    u, z = xz.chunk(2, dim=-1)
    B, C = dbc[..., 3 : 3 + n], dbc[..., 3 + n :]
    delta = (torch.randn(batch, length, d_inner, generator=g) * 0.5 - 1).to(dtype)
    A = -torch.rand(d_inner, n, generator=g) - 0.5
    D, bias = torch.randn(d_inner, generator=g), torch.randn(d_inner, generator=g)
    args = (u, delta, A, B, C, D, z, bias, True, None, True)
    y_ref, h_ref = selective_scan_ref(*args)
    with torch.inference_mode():
        y, h = selective_scan_cpu(*args)
    assert_close("y", y_ref, y, dtype)
    assert_close("final state", h_ref, h, torch.float32)


@needs_compiler
def test_compiled_prefill_in_pieces_equals_whole():
    """The final state carries a prefill on: two calls chained through it equal one call over both parts."""
    inp = make_inputs(1, 40, 20, 16, torch.float32, seed=3)
    with torch.no_grad():
        y_all, h_all = run(selective_scan_cpu, inp)
        first = {k: (v[:, :25] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inp.items()}
        second = {k: (v[:, 25:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inp.items()}
        y1, h1 = run(selective_scan_cpu, first)
        y2, h2 = run(selective_scan_cpu, {**second, "initial_state": h1})
    assert_close("y", y_all, torch.cat([y1, y2], dim=1), "fp32_same_math")
    assert_close("final state", h_all, h2, "fp32_same_math")


@needs_compiler
def test_compiled_empty_sequence_passes_the_state_through():
    inp = make_inputs(2, 0, 5, 3, torch.float32)
    y, h = run(selective_scan_cpu, inp)
    assert y.shape == (2, 0, 5)
    assert torch.equal(h, inp["initial_state"].detach())


def test_compiled_rejects_what_it_does_not_take():
    inp = make_inputs(1, 4, 8, 4, torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        run(selective_scan_cpu, inp)
    bad = make_inputs(1, 4, 8, 4, torch.float32)
    bad["B"] = bad["B"][:, :, :3]
    with pytest.raises(ValueError, match="B must be"):
        run(selective_scan_cpu, bad)


def calls_to_compiled(monkeypatch) -> list[int]:
    calls = []
    real = scan_cpu.selective_scan_cpu

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_cpu, "selective_scan_cpu", counted)
    return calls


@needs_compiler
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_dispatcher_runs_the_compiled_scan_on_cpu_unless_turned_off(monkeypatch, backend):
    calls = calls_to_compiled(monkeypatch)
    inp = make_inputs(1, 12, 10, 4, torch.float32, seed=1)
    y_ref, _ = run(selective_scan_ref, inp)
    with use_backend(backend):
        y_on, _ = run(selective_scan, inp)
        assert len(calls) == 1
        with use_settings(compiled_cpu_scan=False):
            y_off, _ = run(selective_scan, inp)
        assert len(calls) == 1
    assert_close("y compiled", y_ref, y_on, torch.float32)
    assert_close("y chunked", y_ref, y_off, torch.float32)


def unbuilt(monkeypatch, tmp_path):
    """A process that has not built the library yet, with its own empty cache folder."""
    monkeypatch.setattr(scan_cpu, "_library", None)
    monkeypatch.setattr(scan_cpu, "_failure", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))


def test_without_a_compiler_the_dispatcher_falls_back_with_one_warning(monkeypatch, tmp_path):
    unbuilt(monkeypatch, tmp_path)
    monkeypatch.setattr(scan_cpu, "find_compiler", lambda: None)
    inp = make_inputs(1, 12, 10, 4, torch.float32, seed=2)
    y_ref, h_ref = run(selective_scan_ref, inp)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"), use_backend("torch"):
        y, h = run(selective_scan, inp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        with use_backend("torch"):
            run(selective_scan, inp)
    assert_close("y", y_ref, y, torch.float32)
    assert_close("final state", h_ref, h, torch.float32)
    assert "no C++ compiler" in scan_cpu.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        run(selective_scan_cpu, inp)


@needs_compiler
def test_a_failing_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    unbuilt(monkeypatch, tmp_path)
    monkeypatch.setattr(scan_cpu, "FLAG_SETS", (["--no-such-flag"],))
    with pytest.warns(UserWarning, match="failed"):
        assert scan_cpu.library() is None
    assert not list(tmp_path.rglob("*.so"))  # no half-built file left behind


@needs_compiler
def test_build_goes_to_the_extensions_dir_and_is_reused(monkeypatch, tmp_path):
    unbuilt(monkeypatch, tmp_path)
    assert scan_cpu.library() is not None
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1 and built[0].parent == tmp_path / "blackmamba_scan_cpu"
    unbuilt(monkeypatch, tmp_path)

    def no_compile(*args):
        raise AssertionError("rebuilt although the library was in the cache")

    monkeypatch.setattr(scan_cpu, "_compile", no_compile)
    assert scan_cpu.library() is not None
