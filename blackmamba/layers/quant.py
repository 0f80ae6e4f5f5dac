"""fp8 weight-only quantization (e4m3, one scale per output channel), applied to a built model in place.

    s = amax(|W[n, :]|) / 448        (fp32; 448 is e4m3's largest finite value)
    W8 = round_e4m3(W / s)           so W ~ W8 * s, relative error <= 2^-4 (3 mantissa bits)
    y = x @ (W8 * s)^T               in the activations' dtype

What is quantized: the weights a decode step reads most, each Mamba mixer's ``in_proj``, ``x_proj`` and
``out_proj`` (:class:`Fp8Linear`) and the MoE experts' ``w1`` (E, 2F, D) and ``w2`` (E, D, F), with scales
per (expert, output channel), (E, 2F) and (E, D) (:class:`Fp8MoE`). Everything else keeps its dtype: the
embedding and tied head, the norms, the router (its fp32 logits pick the expert), the conv, ``dt_proj``
(D_in x R, small, read inside the fused SSM step with its fp32 bias), A_log and D. The attention and dense
MLP blocks of the paper's baselines are not quantized.

Activations are never quantized. On the Triton backend the fp8 weights are read in place, each output
channel's fp32 sum scaled: by the GEMV for the projections up to the ``gemv_fp8_max_rows`` setting's rows
(:func:`blackmamba.kernels.linear`), by the decode experts of :mod:`blackmamba.kernels.moe_decode`, and by
the grouped GEMMs for the experts of a forward or a larger step up to ``fp8_grouped_max_tokens`` tokens
(:func:`blackmamba.kernels.moe_experts_fp8`). Elsewhere (longer prefills, the other backends, the CPU
without Triton) a weight is dequantized to the input's dtype and the layer's usual path runs on it: one
matmul for a projection, the grouped experts for the MoE (in a decode step without the kernels, only the
experts the tokens use: :func:`experts_per_token`). So an fp8 model computes, up to rounding order, what a
model holding ``W8 * s`` in that dtype computes. The fp8 weights are frozen
parameters (inference only; the trainer refuses such a model). Parameter names stay; the scales are buffers
beside them (``in_proj.scale``, ``w1_scale``), so a checkpoint holds both.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..errors import BlackMambaError
from ..kernels import (
    decode_kernels_apply,
    dequantize,
    gated_activation_ref,
    linear,
    moe_experts_decode,
    moe_experts_fp8,
)
from .mamba import MambaMixer
from .moe import MoE

FP8_MAX = 448.0
MAMBA_PROJECTIONS = ("in_proj", "x_proj", "out_proj")


class QuantizationError(BlackMambaError, ValueError):
    """A model or tensor that cannot be quantized (or a torch without fp8); the message says why."""


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``, or a :class:`QuantizationError` on a torch without it."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise QuantizationError(f"fp8 weights need torch.float8_e4m3fn, which torch {torch.__version__} lacks")
    return dtype


def quantize_tensor(weight: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """weight (..., N, K) -> (W8 (..., N, K) e4m3, scale (..., N) fp32), one scale per output row. A row of
    zeros gets the smallest normal scale and stays zero. Non-finite weights are refused."""
    if not weight.is_floating_point() or weight.ndim < 2:
        raise QuantizationError(f"{name}: expected a floating-point matrix, got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().float()
    if w.device.type != "meta" and not torch.isfinite(w).all():
        raise QuantizationError(f"{name} holds inf or NaN values; it cannot be quantized")
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    w8 = (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype())
    return w8, scale


def experts_per_token(x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, fp8: Fp8MoE, activation: str) -> Tensor:
    """The fp8 experts for a few tokens without a decode kernel: each token's expert alone is gathered and
    dequantized to x's dtype, (T, 2F, D) and (T, D, F), so a step reads T experts rather than all E.
    Same arithmetic as :func:`blackmamba.kernels.moe_experts_ref` on the dequantized weights."""
    dtype = x_TD.dtype
    w1_TFD = dequantize(_rows(fp8.w1, expert_T), fp8.w1_scale[expert_T], dtype)
    h_TF = gated_activation_ref(torch.bmm(w1_TFD, x_TD[:, :, None])[..., 0], activation)
    w2_TDF = dequantize(_rows(fp8.w2, expert_T), fp8.w2_scale[expert_T], dtype)
    y_TD = torch.bmm(w2_TDF, h_TF[:, :, None])[..., 0]
    return y_TD * gate_T[:, None].to(y_TD.dtype)


def _rows(w8: Tensor, index: Tensor) -> Tensor:
    """``w8[index]`` through a byte view: indexing kernels do not cover float8 on every device."""
    return w8.view(torch.uint8)[index].view(w8.dtype)


class Fp8Linear(nn.Module):
    """A Linear without bias whose weight (N, K) is e4m3 with one fp32 scale per output row (N,)."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        if weight.dtype != fp8_dtype() or scale.dtype != torch.float32 or scale.shape != weight.shape[:1]:
            raise QuantizationError(
                f"Fp8Linear wants an e4m3 weight (N, K) and fp32 scales (N,); got {weight.dtype} "
                f"{tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}"
            )
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> Fp8Linear:
        if linear.bias is not None:
            raise QuantizationError(f"{name} has a bias; only bias-free projections are quantized")
        return cls(*quantize_tensor(linear.weight, f"{name}.weight"))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel scales"

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.scale)

    def gemv_weights(self) -> tuple[Tensor, Tensor]:
        """(float8 weight, per-output-channel scale): what the decode step's fused in_proj and conv read."""
        return self.weight, self.scale


class Fp8MoE(MoE):
    """The MoE with e4m3 experts: ``w1`` (E, 2F, D) with ``w1_scale`` (E, 2F), ``w2`` (E, D, F) with
    ``w2_scale`` (E, D). The router and the routing are the MoE's own; the experts run on the weights
    dequantized to the activations' dtype."""

    w1_scale: Tensor
    w2_scale: Tensor

    @classmethod
    def from_moe(cls, moe: MoE, name: str = "moe") -> Fp8MoE:
        w1, s1 = quantize_tensor(moe.w1, f"{name}.w1")
        w2, s2 = quantize_tensor(moe.w2, f"{name}.w2")
        with torch.device("meta"):  # nothing of the new module's own initialisation is kept
            new = cls(moe.config)
        new.router = moe.router
        new.w1 = nn.Parameter(w1, requires_grad=False)
        new.w2 = nn.Parameter(w2, requires_grad=False)
        new.register_buffer("w1_scale", s1)
        new.register_buffer("w2_scale", s2)
        return new.train(moe.training)

    def expert_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return dequantize(self.w1, self.w1_scale, dtype), dequantize(self.w2, self.w2_scale, dtype)

    def experts_eval(self, x_TD: Tensor, expert_T: Tensor, gate_T: Tensor) -> Tensor:
        """An inference forward's experts: the Triton grouped GEMMs on the fp8 weights in place where they apply,
        else dequantized (:func:`blackmamba.kernels.moe_experts_fp8`)."""
        return moe_experts_fp8(x_TD, expert_T, gate_T, self.w1, self.w2, self.w1_scale, self.w2_scale, self.activation)

    def experts_step(self, x_TD: Tensor, expert_T: Tensor, gate_T: Tensor) -> Tensor:
        """A decode step's experts: the fp8 decode kernels where they apply (W8 read in place); without them
        and with fewer tokens than experts, only the experts in use are dequantized
        (:func:`experts_per_token`); else the dispatcher dequantizes all of them."""
        if x_TD.shape[0] < self.n_experts and not decode_kernels_apply(x_TD, gate_T):
            return experts_per_token(x_TD, expert_T, gate_T, self, self.activation)
        return moe_experts_decode(
            x_TD, expert_T, gate_T, self.w1, self.w2, self.activation, w1_scale=self.w1_scale, w2_scale=self.w2_scale
        )


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds fp8 layers."""
    return any(isinstance(m, Fp8Linear | Fp8MoE) for m in model.modules())


@torch.no_grad()
def quantize_fp8(model: nn.Module) -> nn.Module:
    """Quantize ``model`` (a :class:`blackmamba.BlackMamba`) in place: the Mamba projections and the experts
    become fp8 (see the module's docstring) and ``model.config.quantization`` becomes "fp8". Returns it.

    Works on a model on the meta device too (then only the structure changes), which is how a quantized
    checkpoint is loaded."""
    fp8_dtype()
    if is_quantized(model):
        raise QuantizationError("the model is already quantized to fp8")
    for prefix, module in list(model.named_modules()):
        if isinstance(module, MambaMixer):
            for proj in MAMBA_PROJECTIONS:
                setattr(module, proj, Fp8Linear.from_linear(getattr(module, proj), _join(prefix, proj)))
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoE):
                setattr(module, child_name, Fp8MoE.from_moe(child, _join(prefix, child_name)))
    config = getattr(model, "config", None)
    if config is not None:
        model.config = dataclasses.replace(config, quantization="fp8")
    return model


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def quantized_tensors(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict names of the fp8 weights and their scales in ``model``, with the dtype each must have."""
    out: dict[str, torch.dtype] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            out[_join(prefix, "weight")], out[_join(prefix, "scale")] = module.weight.dtype, torch.float32
        elif isinstance(module, Fp8MoE):
            for w in ("w1", "w2"):
                out[_join(prefix, w)], out[_join(prefix, w + "_scale")] = getattr(module, w).dtype, torch.float32
    return out
