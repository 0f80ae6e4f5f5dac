"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty; and the checks
that keep a bad option (NaN, infinity, a wrong type) from silently producing garbage tokens."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

from ..errors import BlackMambaError

# Generation has no length limit (the state is constant-size); this bound only catches a mistyped value.
MAX_NEW_TOKENS = 1_000_000


class GenerationError(BlackMambaError, ValueError):
    """A bad argument to generation; ``option`` names it (``"top_p"``) so a front end can show its own name."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_finite(value: Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_max_new_tokens(max_new_tokens: int) -> None:
    """``max_new_tokens`` is an int in [0, MAX_NEW_TOKENS]."""
    if not _is_int(max_new_tokens):
        raise GenerationError(f"max_new_tokens must be an int, got {max_new_tokens!r}", "max_new_tokens")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerationError(
            f"max_new_tokens must be in [0, {MAX_NEW_TOKENS:,}], got {max_new_tokens}", "max_new_tokens"
        )


def check_sampling_options(
    temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float | None
) -> None:
    """Raise :class:`GenerationError` naming the first option that is of the wrong type or out of range.
    NaN and infinities are refused: they compare false against every bound and would decode garbage."""

    def real(name: str, value: object, ok: bool, bound: str) -> None:
        if not _is_real(value) or not _is_finite(value) or not ok:
            raise GenerationError(f"{name} must be a finite number {bound}, got {value!r}", name)

    real("temperature", temperature, _is_real(temperature) and temperature >= 0, ">= 0 (0 = greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise GenerationError(f"top_k must be an int >= 1, got {top_k!r}", "top_k")
    if top_p is not None:
        real("top_p", top_p, _is_real(top_p) and 0 < top_p <= 1, "in (0, 1]")
    if repetition_penalty is not None:
        real("repetition_penalty", repetition_penalty, _is_real(repetition_penalty) and repetition_penalty > 0, "> 0")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already present (``seen`` (B, V) bool): positive logits are divided by
    ``penalty``, negative ones multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """logits (B, V) -> next token ids (B,). Greedy when ``temperature`` is 0.

    Sampling inverts the CDF of the (filtered) distribution at one uniform number per row: ``uniform`` (B,)
    in [0, 1), or drawn from ``generator``. Nothing here reads from the device, so the step can run inside
    a CUDA graph, and the same uniforms give the same tokens with or without one.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift the row maximum to 0 first and keep the divisor a normal float32: a tiny temperature then sends
    # the other logits to -inf (greedy), where inf/inf or 0/0 would give NaN.
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can leave the target at the very top of the cdf: take the last token with mass then.
    last = (cdf < cdf[:, -1:]).sum(dim=-1)
    return torch.minimum(token, last)
