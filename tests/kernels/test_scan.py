"""The selective scan and its decode step, every backend against the sequential reference: the PyTorch
chunked path, the Triton scan (forward, final state and every gradient) and the Triton decode-step kernel.

On a CPU the Triton kernels run in Triton's interpreter on tiny shapes with a chunk of 8 positions (so several
chunks and a ragged last one are covered); the gpu-marked tests run the real chunk size at full shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from blackmamba.kernels import (
    causal_conv1d_update,
    conv_update_triton,
    get_settings,
    scan_triton,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_scan_triton,
    selective_state_update,
    ssm_update,
    ssm_update_triton,
    use_backend,
    use_settings,
)

from ..helpers import DEVICE, assert_close, nan_filled
from .test_causal_conv1d import conv_step_inputs

pytest.importorskip("triton")

STEPS = 3


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


def run_positional(fn, inp, **kw):
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
    y_ref, h_ref = run_positional(selective_scan_ref, inp)
    grads_ref = torch.autograd.grad((y_ref.float() ** 2).sum() + (h_ref**2).sum(), list(v for v in inp.values()))
    y, h = run_positional(selective_scan_chunked, inp)
    grads = torch.autograd.grad((y.float() ** 2).sum() + (h**2).sum(), list(v for v in inp.values()))
    assert y.dtype == dtype and h.dtype == torch.float32
    assert_close("y", y_ref, y, dtype)
    assert_close("final state", h_ref, h, dtype)
    for name, g, g_ref in zip(inp, grads, grads_ref, strict=True):
        assert_close(f"d{name}", g_ref, g, "fp32_chunked_grad" if dtype == torch.float32 else "bf16_grad")


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    inp = make_inputs(2, 50, 9, 4, torch.float32)
    y_ref, h_ref = run_positional(selective_scan_ref, inp)
    y, h = run_positional(selective_scan_chunked, inp, chunk_size=chunk)
    assert_close("y", y_ref, y, torch.float32)
    assert_close("final state", h_ref, h, torch.float32)


def test_scan_in_pieces_equals_whole():
    inp = make_inputs(2, 40, 6, 4, torch.float32, with_state=False)
    args = [inp[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y_all, h_all = selective_scan_chunked(*args, True, None, True)
    first = [a[:, :17] if a.ndim == 3 else a for a in args]
    second = [a[:, 17:] if a.ndim == 3 else a for a in args]
    y1, h1 = selective_scan_chunked(*first, True, None, True)
    y2, h2 = selective_scan_chunked(*second, True, h1, True)
    assert_close("y", y_all, torch.cat([y1, y2], 1), torch.float32)
    assert_close("final state", h_all, h2, torch.float32)


def test_state_update_steps_equal_the_scan():
    inp = make_inputs(3, 20, 8, 4, torch.float32)
    args = {k: v.detach() for k, v in inp.items()}
    y_ref, h_ref = run_positional(selective_scan_ref, args)
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
    assert_close("y", y_ref, torch.stack(ys, 1), torch.float32)
    assert_close("state", h_ref, state, torch.float32)


def test_bad_shapes_are_named():
    inp = make_inputs(2, 5, 4, 3, torch.float32, with_state=False)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_chunked(inp["u"], inp["delta"], inp["A"], inp["B"][:, :4], inp["C"])
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan_chunked(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], initial_state=torch.ones(1))


@pytest.mark.parametrize("length", [1, 3, 63, 300])
@pytest.mark.parametrize("block_elems", [1, 2**20])
def test_inference_path_matches_reference(length, block_elems):
    """Under no_grad the scan takes the in-place, channel-blocked path; it must equal the reference."""
    inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(3, length, 21, 6, torch.float32).items()}
    y_ref, h_ref = run_positional(selective_scan_ref, inp)
    with torch.no_grad(), use_settings(inplace_block_elems=block_elems):
        y, h = run_positional(selective_scan_chunked, inp)
    assert_close("y", y_ref, y, torch.float32)
    assert_close("final state", h_ref, h, torch.float32)


pytest.importorskip("triton")


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


def run_with_grads(fn, inputs, seed=1):
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
    y, h, grads = run_with_grads(selective_scan_triton, inputs)
    y_ref, h_ref, grads_ref = run_with_grads(selective_scan_ref, inputs)
    assert_close("y", y_ref, y, dtype)
    assert_close("final state", h_ref, h, dtype)
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], torch.float32 if dtype == torch.float32 else "bf16_grad")


@pytest.fixture
def small_chunks():
    with use_settings(scan_chunk=8 if DEVICE.type == "cpu" else 64):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,length,d_in,n", [(2, 19, 13, 4), (1, 1, 5, 16), (1, 8, 3, 3)])
def test_triton_scan_matches_reference(poisoned, small_chunks, dtype, batch, length, d_in, n):
    check(scan_inputs(batch, length, d_in, n, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_small_channel_block(poisoned, small_chunks, dtype):
    """The forward at a channel block smaller than the channels (the default is one channel per lane): several
    programs per row and a ragged last one, also split over the sequence."""
    with use_settings(scan_fwd_config=(4, 1)):
        check(scan_inputs(1, 11, 9, 4, dtype), dtype)
        with use_settings(scan_segments=3):
            check(scan_inputs(1, 17, 5, 2, dtype), dtype)


@pytest.mark.parametrize("n", [4, 3])
def test_triton_scan_packed_rows(poisoned, small_chunks, n):
    """bf16 B and C rows that start at 4-byte boundaries go two values per load in the forward (n even; odd n
    takes one per load): the same results as the reference."""
    inputs = scan_inputs(2, 13, 6, n, torch.bfloat16)
    proj = torch.randn(2, 13, 2 + 2 * n, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    inputs.update(B=proj[..., 2 : 2 + n], C=proj[..., 2 + n :])
    assert scan_triton._row_pack(inputs["B"], inputs["C"], n) == (2 if n % 2 == 0 else 1)
    check(inputs, torch.bfloat16)


@pytest.mark.parametrize("segments", [2, 3])
def test_triton_scan_sequence_segments(poisoned, small_chunks, segments):
    """The forward split over the sequence (two passes and a carry across segments) changes nothing."""
    with use_settings(scan_segments=segments):
        check(scan_inputs(2, 21, 5, 4, torch.float32), torch.float32)
        check(scan_inputs(1, 17, 3, 2, torch.float32, with_state=False), torch.float32)


def test_triton_scan_without_optional_inputs(poisoned, small_chunks):
    inputs = scan_inputs(2, 11, 6, 4, torch.float32, with_state=False)
    inputs.update(D=None, z=None, delta_bias=None)
    y, h, grads = run_with_grads(lambda **kw: selective_scan_triton(**kw, delta_softplus=False), inputs)
    y_ref, h_ref, grads_ref = run_with_grads(lambda **kw: selective_scan_ref(**kw, delta_softplus=False), inputs)
    assert_close("y", y_ref, y, torch.float32)
    assert_close("final state", h_ref, h, torch.float32)
    for name in grads_ref:
        assert_close(f"d{name}", grads_ref[name], grads[name], torch.float32)


def test_public_op_routes_to_triton(small_chunks):
    inputs = scan_inputs(1, 5, 4, 2, torch.float32)
    with torch.no_grad():
        with use_backend("triton"):
            y = selective_scan(**inputs)
        assert_close("y", selective_scan_ref(**inputs), y, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("segments", ["auto", 1, 4])
def test_triton_scan_segments_full_shape(poisoned, segments):
    with use_settings(scan_segments=segments):
        check(scan_inputs(1, 2048, 2944, 16, torch.float32, device=torch.device("cuda")), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,length,d_in", [(1, 1, 2944), (7, 63, 100), (1, 500, 2944), (2, 2048, 2944), (7, 2048, 200)]
)
def test_triton_scan_full_shapes(poisoned, dtype, batch, length, d_in):
    check(scan_inputs(batch, length, d_in, 16, dtype, device=torch.device("cuda")), dtype)


def ssm_inputs(batch, dim, dstate, rank, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    # [dt_low ; B ; C] as views into one x_proj output and [x ; z] into one in_proj output, per step
    xdbl = rand(STEPS, batch, rank + 2 * dstate).to(dtype)
    xz = rand(STEPS, batch, 2 * dim).to(dtype)
    return dict(
        state=rand(batch, dim, dstate),
        x=xz[..., :dim],
        z=xz[..., dim:],
        dt_low=xdbl[..., :rank],
        B=xdbl[..., rank : rank + dstate],
        C=xdbl[..., rank + dstate :],
        dt_weight=rand(dim, rank, scale=rank**-0.5).to(dtype),
        A=-torch.exp(rand(dim, dstate)),
        D=rand(dim),
        dt_bias=rand(dim) - 2,
    )


# Launch layouts of the decode step: the default (two rows per program under the interpreter), one row per
# program with a 16-channel block, four rows per program (the last program partly past the batch), and the
# dt_proj GEMV taken out of the kernel as a GEMM (ssm_fused_dt_max_rows below the rows) or kept in at any row
# count.
UPDATE_LAYOUTS = {
    "default": {},
    "rows1": dict(ssm_update_tiles={64: dict(BLOCK_D=16, ROWS=1, num_warps=1)}),
    "rows4": dict(ssm_update_tiles={64: dict(BLOCK_D=16, ROWS=4, num_warps=1)}),
    "gemm_dt": dict(ssm_fused_dt_max_rows=0),
    "fused_dt": dict(ssm_fused_dt_max_rows=1 << 20),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Rank 130: W_dt's block takes more than one tile (the fused dt's loop over the rank).
@pytest.mark.parametrize(
    "batch,dim,dstate,rank", [(1, 13, 16, 5), (7, 64, 4, 5), (7, 13, 16, 70), (1, 64, 4, 5), (3, 13, 4, 130)]
)
@pytest.mark.parametrize(
    "fused_dt,layout",
    [(fused, layout) for fused in (False, True) for layout in UPDATE_LAYOUTS if fused or not layout.endswith("_dt")],
)
def test_ssm_update_matches_reference(dtype, batch, dim, dstate, rank, fused_dt, layout):
    t = ssm_inputs(batch, dim, dstate, rank, dtype)
    state, ref_state = t["state"], t["state"].clone()
    with use_settings(**UPDATE_LAYOUTS[layout]):
        gemm_dt = fused_dt and batch > get_settings().ssm_fused_dt_max_rows
    for s in range(STEPS):  # consecutive steps carry the state
        dt32 = F.linear(t["dt_low"][s].float(), t["dt_weight"].float())  # the explicit dt_proj, in fp32
        dt, dt_weight = (t["dt_low"][s], t["dt_weight"]) if fused_dt else (dt32.to(dtype), None)
        # Taken out of the kernel, dt_proj is a GEMM in the inputs' dtype: its result is rounded to it.
        dt_ref = F.linear(t["dt_low"][s], t["dt_weight"]) if gemm_dt else dt32 if fused_dt else dt
        args = (t["A"], t["B"][s], t["C"][s], t["D"], t["z"][s], t["dt_bias"], True)
        y_ref = selective_state_update(ref_state, t["x"][s], dt_ref, *args)
        with use_backend("triton"), use_settings(**UPDATE_LAYOUTS[layout]):
            y = ssm_update_triton(state, t["x"][s], dt, *args, dt_weight=dt_weight, out=nan_filled((batch, dim), dtype))
        assert_close("y", y_ref, y, dtype)
        assert_close("state", ref_state, state, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssm_update_without_optional_inputs(dtype):
    t = ssm_inputs(7, 13, 5, 3, dtype)  # N = 5: a masked state tile
    state, ref_state = t["state"], t["state"].clone()
    dt = t["dt_low"][0].float().abs()[:, :1].expand(7, 13)  # positive dt, no softplus; a stride-0 view
    args = (t["x"][0], dt, t["A"], t["B"][0], t["C"][0], None, None, None, False)
    y_ref = selective_state_update(ref_state, *args)
    with use_backend("triton"):
        y = ssm_update_triton(state, *args, out=nan_filled((7, 13), dtype))
    assert_close("y", y_ref, y, dtype)
    assert_close("state", ref_state, state, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_kernels_full_size(dtype, batch):
    dim, dstate, rank, width = 2944, 16, 92, 4
    xs, conv_state, w, b = conv_step_inputs(batch, dim, width, dtype, device="cuda")
    ref_conv_state = conv_state.clone()
    t = ssm_inputs(batch, dim, dstate, rank, dtype, device="cuda")
    state, ref_state = t["state"], t["state"].clone()
    for s in range(STEPS):
        x_ref = causal_conv1d_update(xs[s], ref_conv_state, w, b, "silu")
        x = conv_update_triton(xs[s], conv_state, w, b, "silu", out=nan_filled((batch, dim), dtype, "cuda"))
        assert_close("conv x", x_ref, x, dtype)
        assert_close("conv state", ref_conv_state, conv_state, "exact")
        dt32 = F.linear(t["dt_low"][s].float(), t["dt_weight"].float())
        if batch > get_settings().ssm_fused_dt_max_rows:  # dt_proj runs as a GEMM in dtype before the kernel
            dt32 = F.linear(t["dt_low"][s], t["dt_weight"])
        args = (t["A"], t["B"][s], t["C"][s], t["D"], t["z"][s], t["dt_bias"], True)
        y_ref = selective_state_update(ref_state, x_ref, dt32, *args)
        out = nan_filled((batch, dim), dtype, "cuda")
        # The same x for both (x and x_ref may differ by one bf16 rounding, which the state would carry on).
        y = ssm_update_triton(state, x_ref, t["dt_low"][s], *args, dt_weight=t["dt_weight"], out=out)
        assert_close("y", y_ref, y, dtype)
        assert_close("state", ref_state, state, "fp32_gpu_exp2")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ssm_update_steps_the_states_of_its_slots(backend):
    """Row b of a step advances state ``state_indices[b]`` of a pool exactly as a state of its own would
    advance (the mixer's form: fused dt_proj, A from A_log); the states of other slots stay as they were."""
    t = ssm_inputs(3, 13, 4, 5, torch.float32)
    pool = torch.randn(5, 13, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    slots = torch.tensor([3, 0, 4], device=DEVICE)
    own, others = pool[slots].clone(), pool[[1, 2]].clone()
    A_log = torch.log(-t["A"])
    options = dict(dt_weight=t["dt_weight"], a_from_log=True)
    for s in range(STEPS):
        args = (t["x"][s], t["dt_low"][s], A_log, t["B"][s], t["C"][s], t["D"], t["z"][s], t["dt_bias"], True)
        y_own = selective_state_update(own, *args, **options)
        with use_backend(backend):
            y = ssm_update(pool, *args, **options, state_indices=slots)
        assert_close("y", y_own, y, torch.float32)
        assert_close("states of the slots", own, pool[slots], torch.float32)
    assert torch.equal(pool[[1, 2]], others)
    with pytest.raises(ValueError, match="state_indices"), use_backend("triton"):
        ssm_update_triton(pool, *args, **options, state_indices=slots.float())
