"""The decode loop on static buffers, with the per-token step captured in CUDA graphs.

A :class:`Decoder` keeps, per batch-size bucket (1, 2, 4, ... 256), the recurrent cache, the input tokens,
the uniform numbers for sampling, the repetition-penalty mask and the output tokens in fixed buffers. One
step (every block, the head, logit processing and sampling) reads and writes only those buffers, so on a
GPU it is captured once per bucket in a CUDA graph and replayed: per token the host writes the uniforms
(drawn from the caller's generator, so seeded runs repeat), replays the graph and reads the new tokens
back, which is the only synchronisation, needed to hand the tokens to the caller. Without graphs (CPU,
or ``use_graphs=False``) the same step runs eagerly on the same buffers, so both give the same tokens.

Rows of a bucket beyond the batch decode a dummy sequence; every op treats rows independently, so they
change nothing for the real rows.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import BlackMamba, InferenceCache
from .sampling import apply_repetition_penalty, sample_next

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None


@dataclass
class _Slot:
    """The static buffers of one bucket, and its graph once captured."""

    size: int
    cache: InferenceCache
    tokens: Tensor  # (size,) the input of the next step
    uniform: Tensor  # (size,) one uniform number per row for sampling
    seen: Tensor | None  # (size, V) tokens seen, for the repetition penalty
    out: Tensor  # (size,) the tokens of the last step
    graph: torch.cuda.CUDAGraph | None = None


class Decoder:
    """Decoding for one model and one set of sampling options; reuse it across calls (graphs are kept)."""

    def __init__(
        self, model: BlackMamba, options: SamplingOptions, use_graphs: bool | None = None, buckets: bool | None = None
    ) -> None:
        on_gpu = model.device.type == "cuda"
        if use_graphs and not on_gpu:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        self.model = model
        self.options = options
        self.use_graphs = on_gpu if use_graphs is None else use_graphs
        # Graphs need fixed shapes, hence buckets; eager steps can use the exact batch.
        self.buckets = self.use_graphs if buckets is None else buckets
        config = model.config
        usable = config.tokenizer_vocab_size or config.vocab_size
        # Ids the tokenizer cannot produce (the embedding's padding rows): masked at every step, built once.
        self._unusable = None
        if usable < config.vocab_size:
            self._unusable = torch.arange(config.vocab_size, device=model.device) >= usable
        self._slots: dict[int, _Slot] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        """The smallest bucket that holds ``batch`` rows (larger batches get a bucket of their own size)."""
        return next((b for b in BUCKETS if b >= batch), batch)

    def process(self, logits: Tensor, seen: Tensor | None, uniform: Tensor) -> Tensor:
        """Logits (B, V) of the last position -> next tokens (B,): unusable ids masked, repetition penalty,
        then greedy or sampled with ``uniform``. Reads nothing back from the device."""
        logits = logits.float()
        if self._unusable is not None:
            logits = logits.masked_fill(self._unusable, float("-inf"))
        o = self.options
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, o.repetition_penalty)
        return sample_next(logits, o.temperature, o.top_k, o.top_p, uniform=uniform)

    def _slot(self, size: int) -> _Slot:
        if size in self._slots:
            return self._slots[size]
        model, device = self.model, self.model.device
        vocab = model.config.vocab_size
        slot = _Slot(
            size=size,
            cache=model.allocate_cache(size, device=device),
            tokens=torch.zeros(size, dtype=torch.long, device=device),
            uniform=torch.zeros(size, device=device),
            seen=None
            if self.options.repetition_penalty is None
            else torch.zeros(size, vocab, dtype=torch.bool, device=device),
            out=torch.zeros(size, dtype=torch.long, device=device),
        )
        if self.use_graphs:
            # Warm up on a side stream (kernels compile, the allocator settles), then capture. The cache is
            # reset afterwards by start().
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    self._step(slot)
            torch.cuda.current_stream(device).wait_stream(stream)
            slot.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(slot.graph), torch.inference_mode():
                self._step(slot)
        self._slots[size] = slot
        return slot

    def _step(self, slot: _Slot) -> None:
        logits = self.model.step(slot.tokens, slot.cache)
        tokens = self.process(logits, slot.seen, slot.uniform)
        slot.out.copy_(tokens)
        slot.tokens.copy_(tokens)
        if slot.seen is not None:
            slot.seen.scatter_(1, tokens[:, None], True)

    @torch.inference_mode()
    def start(self, cache: InferenceCache, tokens: Tensor, seen: Tensor | None) -> _Slot:
        """Load a prefilled ``cache`` (batch rows), the first sampled ``tokens`` (B,) and ``seen`` (B, V) into
        the bucket's buffers; rows beyond the batch are reset."""
        batch = tokens.shape[0]
        slot = self._slot(self.bucket(batch) if self.buckets else batch)
        slot.cache.seqlen_offset = cache.seqlen_offset
        for dst, src in zip(slot.cache.layers, cache.layers, strict=True):
            if dst is None:
                continue
            for name in ("conv_state", "ssm_state"):
                buf = getattr(dst, name)
                buf.zero_()
                buf[:batch].copy_(getattr(src, name))
        slot.tokens.zero_()
        slot.tokens[:batch].copy_(tokens)
        if slot.seen is not None:
            slot.seen.zero_()
            slot.seen[:batch].copy_(seen)
        return slot

    @torch.inference_mode()
    def step(self, slot: _Slot, uniform: Tensor | None) -> Tensor:
        """One token for every row of ``slot``: returns the new tokens (size,) on the device."""
        if uniform is not None:
            slot.uniform[: uniform.shape[0]].copy_(uniform)
        if slot.graph is not None:
            slot.graph.replay()
            slot.cache.seqlen_offset += 1  # the model's own count runs only in eager steps
        else:
            self._step(slot)
        return slot.out


_DECODERS: weakref.WeakKeyDictionary[BlackMamba, dict] = weakref.WeakKeyDictionary()


def _weights_key(model: BlackMamba) -> tuple:
    """What a captured graph depends on: where every parameter lives, its dtype, and the mode. Casting or
    moving the model (new parameter storage) must not replay a graph that reads the old storage."""
    return (model.training, tuple((p.data_ptr(), p.dtype) for p in model.parameters()))


def decoder_for(model: BlackMamba, options: SamplingOptions, use_graphs: bool | None = None) -> Decoder:
    """The model's decoder for these options, created on first use and kept (with its graphs) while the
    parameters stay where they are. A model in training mode decodes eagerly (its routing may sync)."""
    if model.training:
        use_graphs = False
    weights = _weights_key(model)
    per_model = _DECODERS.get(model)
    if per_model is None or per_model.get("weights") != weights:
        per_model = {"weights": weights}
        _DECODERS[model] = per_model
    key = (options, use_graphs)
    if key not in per_model:
        per_model[key] = Decoder(model, options, use_graphs)
    return per_model[key]
