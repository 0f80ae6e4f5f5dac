"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty; the options
that say how (:class:`SamplingOptions`, shared by ``generate``, the CLI and the server); and the checks that
keep a bad option (NaN, infinity, a wrong type) from silently producing garbage tokens."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from ..errors import BlackMambaError
from ..options import option

# Generation has no length limit (the state is constant-size); this bound only catches a mistyped value.
MAX_NEW_TOKENS = 1_000_000
SEED_LIMIT = 2**64  # seeds are 0 .. 2**64 - 1, the unsigned range torch.Generator.manual_seed takes


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
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    eos_token_id: int | None = None,
    seed: int | None = None,
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
    if eos_token_id is not None and (not _is_int(eos_token_id) or eos_token_id < 0):
        raise GenerationError(f"eos_token_id must be an int >= 0 or None, got {eos_token_id!r}", "eos_token_id")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise GenerationError(f"seed must be an int from 0 to 2**64 - 1, got {seed!r}", "seed")


def check_prefill_chunk_size(chunk_size: int | None) -> None:
    """``chunk_size`` (prompt positions per prefill forward) is None (all at once) or an int >= 1."""
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise GenerationError(f"prefill chunk size must be an int >= 1, got {chunk_size!r}", "prefill_chunk_size")


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen and when a sequence ends; checked when made (:class:`GenerationError`
    naming the option). ``generate`` and ``stream_generate`` build one from their keywords, ``blackmamba
    generate`` derives its flags from the fields, and the server groups requests by :meth:`logits_only`."""

    temperature: float = option(0.0, "0 = greedy (default); finite and >= 0")
    top_k: int | None = option(None, "sample among the k most likely tokens (k >= 1)")
    top_p: float | None = option(None, "nucleus sampling mass in (0, 1]")
    repetition_penalty: float | None = option(None, "penalty > 1 discourages repeats")
    eos_token_id: int | None = option(None, "end-of-text token id: a sequence stops there (None: never)")
    seed: int | None = option(None, "random seed for sampling (0 to 2**64 - 1)")

    def __post_init__(self) -> None:
        check_sampling_options(
            self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.eos_token_id, self.seed
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def logits_only(self) -> SamplingOptions:
        """These options without the EOS and the seed: all that turning logits into tokens reads, so one
        decoder (and its CUDA graphs) serves every seed and end-of-text token."""
        return dataclasses.replace(self, eos_token_id=None, seed=None)


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
