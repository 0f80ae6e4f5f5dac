"""The Mamba mixer's decode step: the fused kernels (Triton backend) against the reference step."""

import pytest
import torch

from blackmamba.kernels import use_backend

from ..helpers import DEVICE, assert_close, tiny_model

STEPS = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7])
def test_decode_step_matches_mixer_step(dtype, batch):
    mixer = tiny_model().layers[0].mixer.to(DEVICE, dtype)
    g = torch.Generator().manual_seed(batch)
    u = torch.randn(STEPS, batch, mixer.in_proj.in_features, generator=g).to(DEVICE, dtype)
    ref_cache = mixer.allocate_cache(batch)
    cache = mixer.allocate_cache(batch)
    fused = torch.float32 if dtype == torch.float32 else "bf16_fused_dt"
    with torch.no_grad():
        for u_t in u:
            with use_backend("ref"):
                y_ref = mixer.step(u_t, ref_cache)
            with use_backend("triton"):
                y = mixer.step(u_t, cache)
            assert_close("y", y_ref, y, fused)
            assert_close("conv state", ref_cache.conv_state, cache.conv_state, dtype)
            assert_close("ssm state", ref_cache.ssm_state, cache.ssm_state, fused)


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
    fused = torch.float32 if dtype == torch.float32 else "bf16_fused_dt"
    with torch.no_grad():
        for u_t in u:
            with use_backend("ref"):
                y_ref = mixer.step(u_t, ref_cache)
            with use_backend("triton"):
                y = mixer.step(u_t, cache)
            assert_close("y", y_ref, y, fused)
            assert_close("ssm state", ref_cache.ssm_state, cache.ssm_state, fused)
