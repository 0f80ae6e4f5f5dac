"""The Mamba decode step with its projections on the few-row GEMV (the ``gemv_dense`` setting), in_proj with
the conv step in its epilogue or not (``gemv_conv``), equals the step on F.linear, and the fp8-capable
``linear`` and ``linear_conv`` are what the step calls."""

import pytest
import torch

from blackmamba.kernels import gemv, use_backend, use_settings

from ..helpers import DEVICE, assert_close, tiny_model

STEPS = 2


@pytest.fixture
def kernel_calls(monkeypatch):
    """(launcher, shape of x) of each call :func:`blackmamba.kernels.linear` and ``linear_conv`` made to the
    GEMV kernel's launchers: "linear" or "linear+conv"."""
    calls = []

    def count(name, label):
        launch = getattr(gemv, name)

        def counted(*args, **kwargs):
            calls.append((label, tuple(args[0].shape)))
            return launch(*args, **kwargs)

        monkeypatch.setattr(gemv, name, counted)

    count("linear_triton", "linear")
    count("linear_conv_triton", "linear+conv")
    return calls


def run_steps(mixer, u, gemv_dense, gemv_conv=True):
    cache = mixer.allocate_cache(u.shape[1])
    with torch.no_grad(), use_backend("triton"), use_settings(gemv_dense=gemv_dense, gemv_conv=gemv_conv):
        ys = [mixer.step(u_t, cache) for u_t in u]
    return torch.stack(ys), cache


@pytest.mark.parametrize("gemv_conv", [True, False])
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 3), (torch.bfloat16, 1)])
def test_step_on_the_gemv_equals_the_step_off(kernel_calls, dtype, batch, gemv_conv):
    mixer = tiny_model().layers[0].mixer.to(DEVICE, dtype)
    u = torch.randn(STEPS, batch, mixer.in_proj.in_features, generator=torch.Generator().manual_seed(batch))
    u = u.to(DEVICE, dtype)
    y_off, cache_off = run_steps(mixer, u, gemv_dense=False)
    assert kernel_calls == []
    y_on, cache_on = run_steps(mixer, u, gemv_dense=True, gemv_conv=gemv_conv)
    d_in = mixer.d_inner
    in_proj = ("linear+conv" if gemv_conv else "linear", (batch, mixer.in_proj.in_features))
    assert kernel_calls == [in_proj, ("linear", (batch, d_in)), ("linear", (batch, d_in))] * STEPS
    assert_close("y", y_off, y_on, dtype)
    assert_close("ssm state", cache_off.ssm_state, cache_on.ssm_state, dtype)
    assert_close("conv state", cache_off.conv_state, cache_on.conv_state, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_full_size_step_in_a_cuda_graph(batch):
    """The 2.8B mixer's step captured with the GEMV on, replayed, against eager steps with it off."""
    from blackmamba import BlackMambaConfig
    from blackmamba.layers.mamba import MambaMixer

    torch.manual_seed(0)
    mixer = MambaMixer(BlackMambaConfig.from_preset("blackmamba-2.8b")).to("cuda", torch.bfloat16)
    u = torch.randn(batch, mixer.in_proj.in_features, device="cuda", dtype=torch.bfloat16)
    cache, ref_cache = mixer.allocate_cache(batch), mixer.allocate_cache(batch)
    with torch.no_grad(), use_settings(gemv_dense=True):
        for _ in range(2):
            mixer.step(u, mixer.allocate_cache(batch))  # warm-up: compiles, makes the split-K counters
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = mixer.step(u, cache)
    cache.conv_state.zero_()
    cache.ssm_state.zero_()
    with torch.no_grad(), use_settings(gemv_dense=False):
        for _ in range(3):
            graph.replay()
            y_ref = mixer.step(u, ref_cache)
            assert_close("y", y_ref, y, "bf16_fused_dt")
            assert_close("ssm state", ref_cache.ssm_state, cache.ssm_state, "bf16_fused_dt")
