"""Prefill + decode for BlackMamba.

Prefill runs the prompts through one parallel forward that leaves each Mamba block's conv window and
SSM state in the cache; every new token then costs one :meth:`BlackMamba.step`, O(1) in the length so
far, so memory stays constant however long the output. Prompts of different lengths are left-padded
and masked so that each row gets exactly the state it would get alone; prompts shorter than the conv
width are fine (the released code fails on them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..model import BlackMamba
from .sampling import apply_repetition_penalty, sample_next


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty (at least one token is needed)")
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


def _check_options(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = True
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


@torch.inference_mode()
def stream_generate(
    model: BlackMamba,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of each prompt (None once a prompt has hit EOS).

    The EOS token itself is not yielded. Ids the tokenizer cannot produce (``config.tokenizer_vocab_size``
    and above, the embedding's padding rows) are never sampled.
    """
    config = model.config
    _check_prompts(prompts, config.vocab_size)
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens == 0:
        return
    device = model.device
    ids, mask = _left_pad(prompts, device)
    batch = ids.shape[0]
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    usable = config.tokenizer_vocab_size or config.vocab_size
    seen = None
    if repetition_penalty is not None:
        seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, list(p)] = True

    cache = model.allocate_cache(batch, device=device)
    logits = model(ids, cache=cache, mask=mask, num_last_tokens=1).logits[:, -1]
    finished = [False] * batch
    for step in range(max_new_tokens):
        logits = logits.float()
        if usable < logits.shape[-1]:
            logits[:, usable:] = float("-inf")
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tokens = sample_next(logits, temperature, top_k, top_p, generator)
        out: list[int | None] = []
        for i, t in enumerate(tokens.tolist()):
            if not finished[i] and eos_token_id is not None and t == eos_token_id:
                finished[i] = True
            out.append(None if finished[i] else t)
        yield out
        if all(finished) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(batch, device=device), tokens] = True
        logits = model.step(tokens, cache)


def generate(
    model: BlackMamba,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids); returns the new
    tokens per prompt, without the EOS. Greedy when ``temperature`` is 0."""
    results: list[list[int]] = [[] for _ in prompts]
    for step_tokens in stream_generate(
        model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id, seed
    ):
        for i, t in enumerate(step_tokens):
            if t is not None:
                results[i].append(t)
    return results
