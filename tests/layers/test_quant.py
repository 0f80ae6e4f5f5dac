"""fp8 weight-only quantization (blackmamba.layers.quant): the error bound of e4m3 with per-channel scales,
the quantized model against the model holding the dequantized weights, decode against forward, what is and
is not quantized, and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, cast_model
from blackmamba.kernels import dequantize, moe_experts_ref
from blackmamba.layers import MambaMixer, MoE
from blackmamba.layers.quant import (
    FP8_MAX,
    Fp8Linear,
    Fp8MoE,
    QuantizationError,
    experts_per_token,
    quantize_fp8,
    quantize_tensor,
    quantized_tensors,
)
from blackmamba.routing import top1_sigmoid

from ..helpers import DEVICE, ON_GPU, assert_close, rel_err, tiny_model

FP8 = torch.float8_e4m3fn


def spread_rows(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random weights whose rows span five decades of scale, with one row of zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 10 ** (torch.rand(shape[:-1], generator=g)[..., None] * 5 - 3)
    w.view(-1, shape[-1])[1] = 0
    return w


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 17), (2, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_error_is_within_e4m3_rounding(shape, dtype):
    w = spread_rows(shape, seed=shape[-1]).to(dtype)
    w8, scale = quantize_tensor(w)
    assert w8.dtype == FP8 and w8.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == w.shape[:-1]
    ref, dq = w.float(), dequantize(w8, scale)
    # Round to nearest in e4m3: half an ulp, 2^-4 relative for normal values; 2^-10 of the scale (half the
    # subnormal step 2^-9) below 2^-6. A margin for the fp32 division and product.
    bound = (2.0**-4 * ref.abs() + 2.0**-10 * scale[..., None]) * (1 + 1e-5)
    assert ((dq - ref).abs() <= bound).all()
    rows = (dq - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)
    assert rows.max() <= 2.0**-4 and (dq - ref).abs().max() > 0  # it did round something
    # Each row's largest magnitude lands on e4m3's largest value; a row of zeros stays zero.
    peaks = (w8.float().abs().amax(-1))[ref.abs().amax(-1) > 0]
    torch.testing.assert_close(peaks, torch.full_like(peaks, FP8_MAX), rtol=0, atol=0)
    zero = ref.abs().amax(-1) == 0
    assert (dq[zero] == 0).all()


@pytest.mark.parametrize(
    "weight, match",
    [
        (torch.tensor([[1.0, float("nan")]]), "inf or NaN"),
        (torch.tensor([[1.0, float("inf")]]), "inf or NaN"),
        (torch.ones(3, 4, dtype=torch.int32), "floating-point matrix"),
        (torch.ones(5), "floating-point matrix"),
    ],
)
def test_quantize_refuses_bad_tensors(weight, match):
    with pytest.raises(QuantizationError, match=match):
        quantize_tensor(weight, "layers.0.mixer.in_proj.weight")


def dequantized_copy(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every weight that ``quantized`` holds in fp8 replaced by W8 * s in the model's dtype."""
    plain = copy.deepcopy(model)
    params = dict(plain.named_parameters())
    state = quantized.state_dict()
    with torch.no_grad():
        for name, dtype in quantized_tensors(quantized).items():
            if dtype == FP8:
                scale = state[name + "_scale" if name.endswith(("w1", "w2")) else name[: -len("weight")] + "scale"]
                params[name].copy_(dequantize(state[name], scale, params[name].dtype))
    return plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_computes_what_the_dequantized_model_computes(dtype):
    model = cast_model(tiny_model(seed=1), dtype)
    quantized = quantize_fp8(copy.deepcopy(model))
    plain = dequantized_copy(model, quantized)
    ids = torch.randint(1, 256, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, original = plain(ids).logits, quantized(ids).logits, model(ids).logits
    # On the CPU both run the same ops on the same dequantized weights; the GPU's fp8 GEMV sums in another order.
    assert_close("fp8 vs dequantized logits", want, got, dtype if ON_GPU else "exact")
    assert not torch.equal(got, original)


def test_quantized_model_stays_near_the_original():
    # The default initialisation (the randomized test models are chaotic: any change flips experts).
    torch.manual_seed(0)
    model = BlackMamba(BlackMambaConfig.from_preset("tiny")).eval()
    quantized = quantize_fp8(copy.deepcopy(model))
    ids = torch.randint(1, 256, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(quantized(ids).logits, model(ids).logits)
    assert 1e-4 < err < 2.0**-6  # weight errors of ~2^-5 per row, mostly averaging out


@pytest.mark.parametrize("batch", [2, 5])  # fewer tokens than the 4 experts (per-token experts), and more
@pytest.mark.parametrize("prefill", [1, 6])
def test_decode_equals_forward_on_the_fp8_model(batch, prefill):
    model = quantize_fp8(tiny_model(seed=2))
    ids = torch.randint(1, 256, (batch, 16), generator=torch.Generator().manual_seed(batch + prefill))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(batch)
        part = model(ids[:, :prefill], cache=cache).logits
        steps = [model.step(ids[:, t], cache) for t in range(prefill, ids.shape[1])]
    assert all(c is None or c.conv_state.dtype == torch.float32 for c in cache.layers)
    assert_close("prefill logits", full[:, :prefill], part, "fp32_model")
    assert_close("decode logits", full[:, prefill:], torch.stack(steps, 1), "fp32_model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 7])
def test_experts_per_token_equals_the_reference_on_dequantized_weights(dtype, tokens):
    moe = tiny_model(seed=3).layers[1].mixer
    assert isinstance(moe, MoE)
    fp8 = Fp8MoE.from_moe(moe).to(dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, moe.w1.shape[2], generator=g).to(dtype)
    expert, gate = top1_sigmoid(torch.randn(tokens, moe.n_experts, generator=g))
    w1, w2 = fp8.expert_weights(dtype)
    want = moe_experts_ref(x, expert, gate, w1, w2, fp8.activation)
    assert_close("per-token experts", want, experts_per_token(x, expert, gate, fp8, fp8.activation), dtype)


def test_what_is_quantized_and_what_keeps_its_dtype():
    model = cast_model(tiny_model(seed=4), torch.bfloat16)
    kept = {n: (p.dtype, p.clone()) for n, p in model.named_parameters() if not n.endswith(("proj.weight", "w1", "w2"))}
    kept.update({n: (model.get_parameter(n).dtype, None) for n in ("layers.0.mixer.dt_proj.weight",)})
    quantize_fp8(model)
    assert model.config.quantization == "fp8"
    fp8 = {n for n, p in model.named_parameters() if p.dtype == FP8}
    assert fp8 == {f"layers.{i}.mixer.{w}.weight" for i in (0, 2) for w in ("in_proj", "x_proj", "out_proj")} | {
        f"layers.{i}.mixer.{w}" for i in (1, 3) for w in ("w1", "w2")
    }
    assert not any(model.get_parameter(n).requires_grad for n in fp8)
    for name, (dtype, value) in kept.items():
        p = model.get_parameter(name)
        assert p.dtype == dtype, name
        assert value is None or torch.equal(p, value), name
    assert (
        model.layers[0].mixer.A_log.dtype == torch.float32 and model.layers[0].mixer.dt_proj.bias.dtype == torch.float32
    )
    # Casting the quantized model keeps its fp8 weights and their scales as they are.
    before = {n: t.clone() for n, t in model.state_dict().items() if n in quantized_tensors(model)}
    cast_model(model, torch.float32)
    assert all(torch.equal(model.state_dict()[n].view(torch.uint8) if t.dtype == FP8 else model.state_dict()[n],
                           t.view(torch.uint8) if t.dtype == FP8 else t) for n, t in before.items())  # fmt: skip
    assert model.embedding.weight.dtype == torch.float32


def test_quantizing_on_the_meta_device_gives_the_same_structure():
    real = quantize_fp8(tiny_model(seed=5)).state_dict()
    with torch.device("meta"):
        skeleton = BlackMamba(BlackMambaConfig.from_preset("tiny"))
    meta = quantize_fp8(skeleton).state_dict()
    assert {k: (v.dtype, v.shape) for k, v in meta.items()} == {k: (v.dtype, v.shape) for k, v in real.items()}


def test_quantizing_twice_or_without_float8_is_refused(monkeypatch):
    model = quantize_fp8(tiny_model(seed=6))
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_fp8(model)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(QuantizationError, match="float8_e4m3fn"):
        quantize_fp8(tiny_model(seed=6))


def test_fp8_linear_checks_its_parts():
    w8, scale = quantize_tensor(torch.randn(4, 6))
    with pytest.raises(QuantizationError, match="fp32 scales"):
        Fp8Linear(w8, scale[:3])
    with pytest.raises(QuantizationError, match="e4m3 weight"):
        Fp8Linear(w8.float(), scale)
    with pytest.raises(QuantizationError, match="bias"):
        Fp8Linear.from_linear(torch.nn.Linear(6, 4, bias=True), "proj")
    layer = Fp8Linear(w8, scale)
    assert (layer.in_features, layer.out_features) == (6, 4)
    mixer = quantize_fp8(tiny_model(seed=7)).layers[0].mixer
    assert isinstance(mixer, MambaMixer) and isinstance(mixer.in_proj, Fp8Linear)


def test_fp8_model_on_the_triton_backend_equals_the_reference_backend(monkeypatch):
    """The prefill and the decode steps read the fp8 weights in the kernels (Triton's interpreter on the CPU)
    and agree with the reference backend, which dequantizes."""
    pytest.importorskip("triton")
    from blackmamba.kernels import gemv, moe, moe_decode, use_backend

    launches = []  # (kernel, dtype of the weight it read)

    def counting(module, name, weight_arg):
        launch = getattr(module, name)

        def counted(*args, **kwargs):
            launches.append((name, args[weight_arg].dtype))
            return launch(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(gemv, "linear_triton", 1)
    counting(moe_decode, "moe_experts_decode_triton", 3)
    counting(moe, "grouped_gemm", 1)  # the prefill's experts: the grouped GEMMs on the fp8 weights
    model = quantize_fp8(tiny_model(seed=8)).to(DEVICE)
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    logits = {}
    for backend in ("ref", "triton"):
        with torch.no_grad(), use_backend(backend):
            cache = model.allocate_cache(2)
            model(ids[:, :4], cache=cache)
            logits[backend] = torch.stack([model.step(ids[:, t], cache) for t in (4, 5)], 1)
    assert set(launches) == {("linear_triton", FP8), ("moe_experts_decode_triton", FP8), ("grouped_gemm", FP8)}
    assert_close("decode logits, triton vs ref", logits["ref"], logits["triton"], "fp32_model")
