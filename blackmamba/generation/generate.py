"""Prefill + decode for BlackMamba.

Prefill runs the prompts through one parallel forward (in chunks of positions for long prompts, carrying
the state) that leaves each Mamba block's conv window and SSM state in the cache; every new token then
costs one step, O(1) in the length so far, on static buffers (:mod:`.decoder`; captured in CUDA graphs on
a GPU), so memory stays constant however long the output. Prompts of different lengths are left-padded
and masked so that each row gets exactly the state it would get alone; prompts shorter than the conv
width are fine (the released code fails on them). On a GPU the prefill forwards replay CUDA graphs captured
per batch and length bucket (:mod:`.prefill_graphs`): the host then launches no kernels, which at a single
prompt is most of the prefill's time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Integral

import torch
from torch import Tensor

from ..config import BlackMambaConfig
from ..devices import HostCopy
from ..model import BlackMamba, InferenceCache
from .decoder import decoder_for
from .prefill_graphs import prefill_graphs_for
from .sampling import (
    GenerationError,
    SamplingOptions,
    check_max_new_tokens,
    check_prefill_chunk_size,
)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise GenerationError(
            f"generate: prompts must be a list of token-id lists (encode text first), got {type(prompts).__name__}",
            "prompts",
        )
    if not prompts:
        raise GenerationError("generate: no prompts given", "prompts")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise GenerationError(
                f"generate: prompt {i} must be a list of token ids, got {type(p).__name__} (for one prompt pass [ids])",
                "prompts",
            )
        if len(p) == 0:
            raise GenerationError(f"generate: prompt {i} is empty (at least one token is needed)", "prompts")
        bad = [t for t in p if not (isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab_size)]
        if bad:
            raise GenerationError(f"generate: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}", "prompts")


def _left_pad_host(prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor | None]:
    """The prompts left-padded to the longest (B, L) and the mask of real tokens (None: no padding), on the host."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = True
    return ids, (None if bool(mask.all()) else mask)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    ids, mask = _left_pad_host(prompts)
    return ids.to(device), (None if mask is None else mask.to(device))


@torch.inference_mode()
def prefill(
    model: BlackMamba, ids: Tensor, cache: InferenceCache, mask: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """Run prompts ``ids`` (B, L) into ``cache``, ``chunk_size`` positions at a time (all at once by default);
    returns the logits of the last position (B, V). Only the last position's logits are computed."""
    check_prefill_chunk_size(chunk_size)
    length = ids.shape[1]
    chunk = chunk_size or length
    for start in range(0, length, chunk):
        part_mask = None if mask is None else mask[:, start : start + chunk]
        logits = model(ids[:, start : start + chunk], cache=cache, mask=part_mask, num_last_tokens=1).logits
    return logits[:, -1]


@torch.inference_mode()
def _check_kv_capacity(config: BlackMambaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Attention blocks keep ``max_seq_len`` positions per sequence; a CUDA-graph step cannot check that
    limit on the device, so a run that would pass it is refused before it starts."""
    if "attention" not in config.layer_pattern:
        return
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > config.max_seq_len:
        raise GenerationError(
            f"the longest prompt plus max_new_tokens is {longest} positions, more than the {config.max_seq_len} "
            "the attention blocks' KV cache holds (max_seq_len in the model's config)",
            "max_new_tokens",
        )


def _queue_ahead(device: torch.device) -> bool:
    """Whether the next decode step is queued before the current tokens are read: on a GPU, where the read
    waits only for its own copy and the device works meanwhile."""
    return device.type == "cuda"


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
    cuda_graphs: bool | None = None,
    prefill_chunk_size: int | None = None,
    prefill_graphs: bool | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of each prompt (None once a prompt has hit EOS).

    The EOS token itself is not yielded. Ids the tokenizer cannot produce (``config.tokenizer_vocab_size``
    and above, the embedding's padding rows) are never sampled. ``cuda_graphs``: replay the decode step
    from CUDA graphs (default: on a GPU); ``prefill_chunk_size``: positions per prefill forward;
    ``prefill_graphs``: replay the prefill from CUDA graphs per batch and length bucket
    (:mod:`.prefill_graphs`; default: as ``cuda_graphs``). On a GPU the step after the one being yielded is
    already queued, so a caller that stops early (or every row at EOS) has paid for one extra step.
    """
    config = model.config
    _check_prompts(prompts, config.vocab_size)
    check_max_new_tokens(max_new_tokens)
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, eos_token_id, seed)
    check_prefill_chunk_size(prefill_chunk_size)
    if max_new_tokens == 0:
        return
    _check_kv_capacity(config, prompts, max_new_tokens)
    device = model.device
    if prefill_graphs is None:
        prefill_graphs = cuda_graphs is not False and device.type == "cuda" and not model.training
    prefiller = prefill_graphs_for(model, True) if prefill_graphs else None
    batch = len(prompts)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def uniforms() -> Tensor | None:
        return None if options.greedy else torch.rand(batch, generator=generator, device=device)

    decoder = decoder_for(model, options, cuda_graphs)
    seen = None
    if repetition_penalty is not None:
        seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, list(p)] = True
    cache = model.allocate_cache(batch, device=device)
    if prefiller is None:
        ids, mask = _left_pad(prompts, device)
        logits = prefill(model, ids, cache, mask, prefill_chunk_size)
    else:
        ids, mask = _left_pad_host(prompts)
        logits = prefiller.run(ids, cache, mask, chunk_size=prefill_chunk_size)
    first = uniforms()
    tokens = decoder.process(logits, seen, torch.zeros(batch, device=device) if first is None else first)
    bucket = None

    def launch() -> HostCopy:
        """Queue the next decode step and the copy of its tokens to the host; reads nothing back."""
        nonlocal bucket
        if bucket is None:
            if seen is not None:
                seen[torch.arange(batch, device=device), tokens] = True
            bucket = decoder.start(cache, tokens, seen)
        return HostCopy(decoder.step(bucket, uniforms())[:batch])

    # From the second step on (the first token is yielded before the decode graph is captured), the step
    # after the current one may be queued before the current tokens are read (_queue_ahead).
    ahead = _queue_ahead(device)
    current = HostCopy(tokens[:batch])
    finished = [False] * batch
    for step in range(max_new_tokens):
        queued = launch() if ahead and 0 < step < max_new_tokens - 1 else None
        out: list[int | None] = []
        for i, t in enumerate(current.tolist()):
            if not finished[i] and eos_token_id is not None and t == eos_token_id:
                finished[i] = True
            out.append(None if finished[i] else t)
        yield out
        if all(finished) or step == max_new_tokens - 1:
            return
        current = queued if queued is not None else launch()


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
    cuda_graphs: bool | None = None,
    prefill_chunk_size: int | None = None,
    prefill_graphs: bool | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids); returns the new
    tokens per prompt, without the EOS. Greedy when ``temperature`` is 0. See :func:`stream_generate`."""
    results: list[list[int]] = [[] for _ in prompts]
    for step_tokens in stream_generate(
        model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id, seed,
        cuda_graphs, prefill_chunk_size, prefill_graphs,
    ):  # fmt: skip
        for i, t in enumerate(step_tokens):
            if t is not None:
                results[i].append(t)
    return results
