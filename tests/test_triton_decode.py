"""Decode-step kernels (conv window update, SSM state update, the whole mixer step) against their references."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from blackmamba.kernels import (
    causal_conv1d_update,
    conv_update_triton,
    mamba_decode_step,
    selective_state_update,
    ssm_update_triton,
    use_backend,
)
from blackmamba.kernels.tl_math import softplus

from .conftest import DEVICE, TOL, nan_filled, rel_err, tiny_model

STEPS = 3


def conv_inputs(batch, dim, width, dtype, device=DEVICE, seed=0):
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
    xs, state, w, b = conv_inputs(batch, dim, width, dtype)
    b = b if bias else None
    ref_state = state.clone()
    rtol, atol = TOL[dtype]
    for x in xs:  # consecutive steps carry the window
        y_ref = causal_conv1d_update(x, ref_state, w, b, activation)
        with use_backend("triton"):
            y = conv_update_triton(x, state, w, b, activation, out=nan_filled((batch, dim), dtype))
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(state, ref_state, rtol=0, atol=0)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,dstate,rank", [(1, 13, 16, 5), (7, 64, 4, 5), (7, 13, 16, 70), (1, 64, 4, 5)])
@pytest.mark.parametrize("fused_dt", [False, True])
def test_ssm_update_matches_reference(dtype, batch, dim, dstate, rank, fused_dt):
    t = ssm_inputs(batch, dim, dstate, rank, dtype)
    state, ref_state = t["state"], t["state"].clone()
    rtol, atol = TOL[dtype]
    for s in range(STEPS):  # consecutive steps carry the state
        dt32 = F.linear(t["dt_low"][s].float(), t["dt_weight"].float())  # the explicit dt_proj, in fp32
        dt, dt_weight = (t["dt_low"][s], t["dt_weight"]) if fused_dt else (dt32.to(dtype), None)
        args = (t["A"], t["B"][s], t["C"][s], t["D"], t["z"][s], t["dt_bias"], True)
        y_ref = selective_state_update(ref_state, t["x"][s], dt32 if fused_dt else dt, *args)
        with use_backend("triton"):
            y = ssm_update_triton(state, t["x"][s], dt, *args, dt_weight=dt_weight, out=nan_filled((batch, dim), dtype))
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(state, ref_state, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssm_update_without_optional_inputs(dtype):
    t = ssm_inputs(7, 13, 5, 3, dtype)  # N = 5: a masked state tile
    state, ref_state = t["state"], t["state"].clone()
    dt = t["dt_low"][0].float().abs()[:, :1].expand(7, 13)  # positive dt, no softplus; a stride-0 view
    args = (t["x"][0], dt, t["A"], t["B"][0], t["C"][0], None, None, None, False)
    y_ref = selective_state_update(ref_state, *args)
    with use_backend("triton"):
        y = ssm_update_triton(state, *args, out=nan_filled((7, 13), dtype))
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7])
def test_decode_step_matches_mixer_step(dtype, batch):
    mixer = tiny_model().layers[0].mixer.to(DEVICE, dtype)
    g = torch.Generator().manual_seed(batch)
    u = torch.randn(STEPS, batch, mixer.in_proj.in_features, generator=g).to(DEVICE, dtype)
    ref_cache = mixer.allocate_cache(batch)
    cache = mixer.allocate_cache(batch)
    weights = (
        mixer.in_proj.weight,
        mixer.conv1d.weight[:, 0, :],
        mixer.conv1d.bias,
        mixer.x_proj.weight,
        mixer.dt_proj.weight,
        mixer.dt_proj.bias,
        mixer.A_log,
        mixer.D,
        mixer.out_proj.weight,
    )
    rtol, atol = TOL[dtype]
    with torch.no_grad():
        for u_t in u:
            with use_backend("ref"):
                y_ref = mixer.step(u_t, ref_cache)
            with use_backend("triton"):
                y = mamba_decode_step(u_t, cache.conv_state, cache.ssm_state, *weights)
            # bf16: the fused dt skips one bf16 rounding, so allow a few roundings more
            scale = 1 if dtype == torch.float32 else 5
            torch.testing.assert_close(y, y_ref, rtol=rtol * scale, atol=atol * scale)
            torch.testing.assert_close(cache.conv_state, ref_cache.conv_state, rtol=rtol, atol=atol)
            torch.testing.assert_close(cache.ssm_state, ref_cache.ssm_state, rtol=rtol * scale, atol=atol * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_kernels_full_size(dtype, batch):
    dim, dstate, rank, width = 2944, 16, 92, 4
    xs, conv_state, w, b = conv_inputs(batch, dim, width, dtype, device="cuda")
    ref_conv_state = conv_state.clone()
    t = ssm_inputs(batch, dim, dstate, rank, dtype, device="cuda")
    state, ref_state = t["state"], t["state"].clone()
    rtol, atol = TOL[dtype]
    for s in range(STEPS):
        x_ref = causal_conv1d_update(xs[s], ref_conv_state, w, b, "silu")
        x = conv_update_triton(xs[s], conv_state, w, b, "silu", out=nan_filled((batch, dim), dtype, "cuda"))
        torch.testing.assert_close(x, x_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(conv_state, ref_conv_state, rtol=0, atol=0)
        dt32 = F.linear(t["dt_low"][s].float(), t["dt_weight"].float())
        args = (t["A"], t["B"][s], t["C"][s], t["D"], t["z"][s], t["dt_bias"], True)
        y_ref = selective_state_update(ref_state, x_ref, dt32, *args)
        out = nan_filled((batch, dim), dtype, "cuda")
        # The same x for both (x and x_ref may differ by one bf16 rounding, which the state would carry on).
        y = ssm_update_triton(state, x_ref, t["dt_low"][s], *args, dt_weight=t["dt_weight"], out=out)
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 64])
def test_fused_mixer_step_full_size(dtype, batch):
    """The 2.8B mixer's decode step on the fused kernels against the reference step, several tokens."""
    from blackmamba import BlackMambaConfig
    from blackmamba.layers.mamba import MambaMixer

    torch.manual_seed(0)
    mixer = MambaMixer(BlackMambaConfig.from_preset("blackmamba-2.8b")).to("cuda", dtype)
    with torch.no_grad():
        mixer.A_log.copy_(torch.rand_like(mixer.A_log) * 2.5)
    u = torch.randn(STEPS, batch, mixer.in_proj.in_features, device="cuda", dtype=dtype)
    ref_cache, cache = mixer.allocate_cache(batch), mixer.allocate_cache(batch)
    with torch.no_grad():
        for u_t in u:
            with use_backend("ref"):
                y_ref = mixer.step(u_t, ref_cache)
            with use_backend("triton"):
                y = mixer.step(u_t, cache)
            assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 2e-2)
            assert rel_err(cache.ssm_state, ref_cache.ssm_state) < (1e-5 if dtype == torch.float32 else 2e-2)


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
    assert ((y.double() - ref) / ref).abs().max() < 2e-6
