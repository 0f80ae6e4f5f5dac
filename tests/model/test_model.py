"""Whole-model invariants: decode equals forward, backends agree, padding is exact, routing ties."""

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, cast_model
from blackmamba.kernels import use_backend
from blackmamba.routing import top1_sigmoid

from ..helpers import assert_caches_close, assert_close, tiny_model


def test_logits_shape_and_dtype(tiny):
    ids = torch.randint(0, 256, (3, 11))
    out = tiny(ids)
    assert out.logits.shape == (3, 11, 256)
    assert out.logits.dtype == torch.float32
    with pytest.raises(ValueError, match="batch, length"):
        tiny(ids[0])


@pytest.mark.parametrize("prefill", [1, 2, 5, 17])
def test_decode_equals_forward(tiny, prefill):
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(prefill))
    with torch.no_grad():
        full = tiny(ids).logits
        cache = tiny.allocate_cache(2)
        part = tiny(ids[:, :prefill], cache=cache).logits
        steps = [tiny.step(ids[:, t], cache) for t in range(prefill, 30)]
    assert_close("prefill logits", full[:, :prefill], part, "fp32_model")
    assert_close("decode logits", full[:, prefill:], torch.stack(steps, 1), "fp32_model")


def test_chunked_prefill_equals_one_prefill(tiny):
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = tiny(ids).logits
        cache = tiny.allocate_cache(2)
        pieces = [tiny(ids[:, a:b], cache=cache).logits for a, b in ((0, 3), (3, 20), (20, 40))]
    assert_close("logits", full, torch.cat(pieces, 1), torch.float32)


def test_cache_size_is_constant(tiny):
    cache = tiny.allocate_cache(1)
    sizes = [sum(t.numel() for c in cache.layers if c is not None for t in (c.conv_state, c.ssm_state))]
    with torch.no_grad():
        tiny(torch.randint(0, 256, (1, 50)), cache=cache)
        for _ in range(20):
            tiny.step(torch.tensor([3]), cache)
    sizes.append(sum(t.numel() for c in cache.layers if c is not None for t in (c.conv_state, c.ssm_state)))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_and_fast_backends_agree_forward_and_backward(dtype):
    model = tiny_model(3)
    cast_model(model, dtype)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits = model(ids).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast, g_fast = run()
    with use_backend("ref"):
        ref, g_ref = run()
    fp32 = dtype == torch.float32
    assert_close("logits", ref, fast, torch.float32 if fp32 else "bf16_routing_ties")
    for name in g_ref:
        assert_close(name, g_ref[name], g_fast[name], "fp32_model" if fp32 else "bf16_routing_ties_grad")


def test_left_padding_mask_is_exact(tiny):
    short = torch.randint(1, 256, (1, 6))
    padded = torch.cat([torch.full((1, 4), 7), short], 1)
    mask = torch.tensor([[False] * 4 + [True] * 6])
    with torch.no_grad():
        alone = tiny(short).logits
        cache_a = tiny.allocate_cache(1)
        tiny(short, cache=cache_a)
        cache_p = tiny.allocate_cache(1)
        with_pad = tiny(padded, cache=cache_p, mask=mask).logits[:, 4:]
    assert_close("logits", alone, with_pad, torch.float32)
    assert_caches_close(cache_a, cache_p)


def test_fp32_params_stay_fp32_when_cast():
    model = cast_model(tiny_model(), torch.bfloat16)
    for name, p in model.named_parameters():
        expected = torch.float32 if name.endswith(("A_log", "mixer.D", "dt_proj.bias")) else torch.bfloat16
        assert p.dtype == expected, name
    out = model(torch.randint(0, 256, (1, 9))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_all_mamba_pattern_and_parameter_counts():
    config = BlackMambaConfig.from_preset("tiny", layer_pattern=["mamba", "mamba"])
    model = BlackMamba(config)
    assert model.num_parameters() == model.num_parameters(active=True)
    moe = BlackMamba(BlackMambaConfig.from_preset("tiny"))
    assert moe.num_parameters(active=True) < moe.num_parameters()


def test_top1_ties_go_to_lowest_expert_like_the_reference():
    logits = torch.tensor([[40.0, 50.0, 50.0], [0.1, 0.3, 0.2], [-1.0, -1.0, -2.0]])
    expert, gate = top1_sigmoid(logits)
    assert expert.tolist() == [0, 1, 0]  # sigmoid(40) == sigmoid(50) == 1.0 in fp32
    assert_close("gate", torch.sigmoid(torch.tensor([40.0, 0.3, -1.0])), gate, "fp32_same_math")


def test_forward_and_backward_under_bf16_autocast():
    """Training on GPU runs fp32 weights under bf16 autocast; the CPU autocast exercises the same dtypes."""
    model = tiny_model(4).train()
    ids = torch.randint(0, 256, (2, 20))
    for backend in ("torch", "ref"):
        with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        logits.float().logsumexp(-1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
