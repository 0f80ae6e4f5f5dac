"""Exact whole-document log-likelihoods with the recurrent state, and perplexity / bits per byte.

A Mamba model has no context window: a document of any length is scored exactly by running it through
the model in chunks that carry the recurrent cache (conv window + SSM state) from one chunk to the next.
Each document is preceded by the end-of-text token, so its first token is predicted too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import BlackMambaError
from ..model import BlackMamba

DEFAULT_CHUNK = 1024


class PerplexityError(BlackMambaError, ValueError):
    """A bad argument to scoring (a chunk length below 1), or nothing to score."""


class NoTokensError(PerplexityError):
    """Nothing to score: every text given encodes to no tokens."""


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, eos_id: int
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as they fall in the encoding of the whole text.

    Trailing whitespace of the context moves to the continuation (BPE merges a space with the following
    word). The context is encoded alone and the continuation is what the whole encoding holds after it.
    An empty context becomes the end-of-text token.
    """
    if not context:
        return [eos_id], encode(continuation)
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    if not context:  # the context was only whitespace
        return [eos_id], encode(continuation)
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


@dataclass
class DocumentScore:
    """Sum of log-probabilities (nats) of ``n_tokens`` predicted tokens; ``greedy`` when every target
    was the argmax; ``expert_counts`` (n_moe_blocks, E) tokens routed to each expert (None without MoE)."""

    logprob: float
    n_tokens: int
    greedy: bool
    expert_counts: torch.Tensor | None = None


@torch.inference_mode()
def document_logprob(
    model: BlackMamba,
    tokens: Sequence[int],
    eos_id: int,
    chunk: int = DEFAULT_CHUNK,
    prefix: Sequence[int] = (),
    on_chunk: Callable[[int], None] | None = None,
) -> DocumentScore:
    """Log-likelihood of ``tokens`` after ``prefix`` (the end-of-text token when ``prefix`` is empty).

    The inputs are ``prefix + tokens[:-1]``; they run through the model ``chunk`` tokens at a time with
    the recurrent cache, so the result equals one forward over the whole sequence. ``on_chunk(n)`` is
    called after each chunk with the number of input tokens it held (for progress reports).
    """
    if chunk < 1:
        raise PerplexityError(f"chunk must be >= 1, got {chunk}")
    prefix = list(prefix) or [eos_id]
    tokens = list(tokens)
    if not tokens:
        return DocumentScore(0.0, 0, True, None)
    device = model.device
    inputs = torch.tensor(prefix + tokens[:-1], dtype=torch.long, device=device)
    targets = torch.tensor(tokens, dtype=torch.long, device=device)
    skip = len(prefix) - 1  # positions whose predictions are not scored (inside the prefix)
    cache = model.allocate_cache(1, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    greedy = True
    counts = None
    for start in range(0, inputs.numel(), chunk):
        ids = inputs[start : start + chunk]
        out = model(ids[None], cache=cache)
        if out.expert_counts is not None:
            c = out.expert_counts.double()
            counts = c if counts is None else counts + c
        lo = max(skip - start, 0)  # first scored position in this chunk
        if lo < ids.numel():
            logp = F.log_softmax(out.logits[0, lo:].float(), dim=-1)
            tgt = targets[start + lo - skip : start + ids.numel() - skip]
            total += logp.gather(-1, tgt[:, None]).double().sum()
            greedy = greedy and bool((logp.argmax(-1) == tgt).all())
        if on_chunk is not None:
            on_chunk(ids.numel())
    return DocumentScore(total.item(), len(tokens), greedy, None if counts is None else counts.cpu())


@dataclass
class PerplexityResult:
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    n_tokens: int
    n_bytes: int
    n_documents: int
    expert_counts: torch.Tensor | None = field(default=None, repr=False)  # (n_moe_blocks, E)

    def expert_fractions(self) -> torch.Tensor | None:
        """Fraction of tokens per expert in each MoE block (rows sum to 1)."""
        if self.expert_counts is None:
            return None
        return self.expert_counts / self.expert_counts.sum(-1, keepdim=True).clamp_min(1)

    def to_dict(self) -> dict:
        fractions = self.expert_fractions()
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
            "n_documents": self.n_documents,
            "expert_fractions": None if fractions is None else fractions.tolist(),
        }


def run_model_perplexity(
    model: BlackMamba,
    texts: Iterable[str],
    encode: Callable[[str], list[int]],
    eos_id: int,
    chunk: int = DEFAULT_CHUNK,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Loss, perplexity and bits per byte of ``model`` on ``texts`` (each scored from an end-of-text
    token). ``max_tokens`` stops after that many scored tokens; the last document is then cut and its
    byte count taken pro rata. ``progress(documents, tokens)`` is called with increments as the work
    advances (after every chunk of a document, and once more when it is finished)."""
    on_chunk = None if progress is None else (lambda n: progress(0, n))
    total_logprob = 0.0
    n_tokens = n_bytes = n_docs = 0
    counts = None
    for text in texts:
        tokens = encode(text)
        if not tokens:
            continue
        nbytes = len(text.encode("utf-8"))
        if max_tokens is not None and n_tokens + len(tokens) > max_tokens:
            keep = max_tokens - n_tokens
            if keep <= 0:
                break
            nbytes = round(nbytes * keep / len(tokens))  # bytes of the kept part, pro rata
            tokens = tokens[:keep]
        score = document_logprob(model, tokens, eos_id, chunk, on_chunk=on_chunk)
        if progress is not None:
            progress(1, 0)
        total_logprob += score.logprob
        n_tokens += score.n_tokens
        n_bytes += nbytes
        n_docs += 1
        if score.expert_counts is not None:
            counts = score.expert_counts if counts is None else counts + score.expert_counts
    if n_tokens == 0:
        raise NoTokensError("no tokens to evaluate: every text is empty")
    loss = -total_logprob / n_tokens
    return PerplexityResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=-total_logprob / math.log(2) / max(n_bytes, 1),
        n_tokens=n_tokens,
        n_bytes=n_bytes,
        n_documents=n_docs,
        expert_counts=counts,
    )
