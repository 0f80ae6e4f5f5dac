"""Programmatic dependent launch (the ``pdl_max_rows`` kernel setting): the decode kernels compute the same
thing with it as without; it is never used off sm_90, on the CPU, or beyond the setting's rows."""

import copy

import pytest
import torch

from blackmamba.config import BlackMambaConfig
from blackmamba.generation import Decoder, SamplingOptions
from blackmamba.kernels import linear_triton, use_settings
from blackmamba.kernels.tl_math import pdl_launch
from blackmamba.layers.quant import quantize_fp8
from blackmamba.model import BlackMamba, cast_model

from ..helpers import DEVICE, randomize


def test_pdl_is_never_used_on_the_cpu():
    x = torch.randn(2, 8)
    with use_settings(pdl_max_rows=64):
        assert not pdl_launch(x, 2)


@pytest.mark.gpu
def test_pdl_follows_the_row_threshold():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    x = torch.randn(4, 8, device="cuda")
    with use_settings(pdl_max_rows=4):
        assert pdl_launch(x, 1) and pdl_launch(x, 4) and not pdl_launch(x, 5) and not pdl_launch(x, 0)
    with use_settings(pdl_max_rows=0):
        assert not pdl_launch(x, 1)


@pytest.mark.parametrize("pdl", [False, True])
def test_the_setting_changes_no_result(pdl):
    """The GEMV with the setting on and off, on the GPU (eager launches, PDL there on sm_90) or in the
    interpreter (where it is never used): the reference's result either way."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 100, generator=gen).to(DEVICE), torch.randn(37, 100, generator=gen).to(DEVICE)
    with use_settings(pdl_max_rows=64 if pdl else 0):
        y = linear_triton(x, w)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model_28b_widths() -> BlackMamba:
    """The 2.8B widths (tiles and split-K as in the real model) with four layers, random, bf16, on the GPU."""
    layers = 4
    config = BlackMambaConfig.from_preset("blackmamba-2.8b", layer_pattern=["mamba", "moe"] * (layers // 2))
    torch.manual_seed(0)
    return cast_model(randomize(BlackMamba(config), 0).eval().cuda(), torch.bfloat16)


@pytest.fixture(scope="module")
def model_28b_widths_fp8(model_28b_widths) -> BlackMamba:
    """The same model with its projections and experts in fp8 (weight-only, layers/quant.py)."""
    return quantize_fp8(copy.deepcopy(model_28b_widths))


@pytest.mark.gpu
@pytest.mark.parametrize(("weights", "gemv_dense"), [("bf16", False), ("bf16", True), ("fp8", True)])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_graphed_decode_with_pdl_is_bitwise_the_same(request, weights, gemv_dense, batch):
    """PDL only changes when kernels start: the graphed steps give the same logits and states, bit for bit
    (bf16 weights with the projections on cuBLAS or on the GEMV; fp8 weights, whose projections and experts
    always take the Triton kernels)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    model = request.getfixturevalue("model_28b_widths" if weights == "bf16" else "model_28b_widths_fp8")
    tokens = torch.randint(1, 50000, (batch,), device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    out = {}
    for pdl in (False, True):
        with use_settings(pdl_max_rows=64 if pdl else 0, gemv_dense=gemv_dense), torch.inference_mode():
            assert pdl_launch(tokens, batch) == pdl
            decoder = Decoder(model, SamplingOptions(), use_graphs=True)
            bucket = decoder.start(model.allocate_cache(batch), tokens, None)
            steps = [decoder.step(bucket, None)[:batch].clone() for _ in range(12)]
            # One eager step from the graphs' final state: its logits, and the states themselves.
            logits = model.step(bucket.tokens, bucket.pool, bucket.slots).float()
            out[pdl] = (torch.stack(steps), logits, [t.clone() for t in bucket.pool.tensors()])
    (tok0, log0, st0), (tok1, log1, st1) = out[False], out[True]
    assert torch.equal(tok0, tok1)
    assert torch.equal(log0, log1)
    assert all(torch.equal(a, b) for a, b in zip(st0, st1, strict=True))
