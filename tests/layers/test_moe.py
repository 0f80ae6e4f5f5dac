"""The MoE layer's decode step takes the decode kernels exactly where they apply."""

import pytest
import torch

import blackmamba.kernels.moe_decode as moe_decode
from blackmamba.kernels import use_backend, use_settings

from ..helpers import DEVICE, assert_close, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_step_takes_the_decode_kernels(monkeypatch, dtype):
    """The MoE layer's decode step on the Triton backend takes the decode kernels (and only then)."""
    layer = tiny_model().layers[1].mixer.to(DEVICE, dtype)
    assert layer.__class__.__name__ == "MoE"
    x = torch.randn(9, layer.w1.shape[2], generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    calls = []
    real = moe_decode.moe_experts_decode_triton
    monkeypatch.setattr(moe_decode, "moe_experts_decode_triton", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        with use_backend("ref"):
            y_ref = layer.step(x, None)
        with use_backend("triton"):
            y = layer.step(x, None)
            assert len(calls) == 1
            layer(x[None])  # the forward (with statistics): the general path
            assert len(calls) == 1
            with use_settings(decode_tokens=8):  # more tokens than the setting allows: the general path
                layer.step(x, None)
            assert len(calls) == 1
    # bf16: the reference rounds h and act(h) to bf16, the interpreter run keeps them fp32
    assert_close("y", y_ref, y, dtype)
    with use_backend("triton"):
        layer.step(x, None)  # autograd on: the general path (which has a backward)
    assert len(calls) == 1
