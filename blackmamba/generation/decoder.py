"""The decode loop on static buffers, with the per-token step captured in CUDA graphs.

A :class:`Decoder` keeps, per batch-size bucket (1, 2, 4, ... 256), the input tokens, the slot of each row
in a pool of decode states (:class:`~blackmamba.model.InferenceCache`), the uniform numbers for sampling,
the repetition-penalty mask and the output tokens in fixed buffers. One step (every block, the head, logit
processing and sampling) reads and writes only those buffers and the pool, so on a GPU it is captured once
per bucket in a CUDA graph and replayed: per token the host writes the uniforms (drawn from the caller's
generator, so seeded runs repeat), replays the graph and reads the new tokens back, which is the only
synchronisation, needed to hand the tokens to the caller. Without graphs (CPU, or ``use_graphs=False``)
the same step runs eagerly on the same buffers, so both give the same tokens.

Row b of a step decodes the sequence in slot ``slots[b]`` of the pool; with buckets, rows beyond the batch
decode a dummy sequence in the pool's pad slot (its last); every op treats rows independently, so they
change nothing for the real rows. By default each bucket has a pool of its own (one slot per row and the
pad slot; without buckets, an exact batch of slots stepped without indices); given a ``pool``, every
bucket works over it, its last slot reserved as the pad. A decoder runs one generation at a time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import BlackMamba, InferenceCache
from .sampling import SamplingOptions, apply_repetition_penalty, sample_next

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def warm_up_on_side_stream(fn: Callable[[], object], device: torch.device, times: int = 2) -> None:
    """Run ``fn`` ``times`` times on a side stream ordered after the current one (kernels compile, the
    allocator settles), then order the current stream after it: what a CUDA graph capture of ``fn`` needs
    first."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)


@dataclass
class _Bucket:
    """The static buffers of one bucket, its pool of decode states, and its graph once captured."""

    size: int
    pool: InferenceCache
    slots: Tensor | None  # (size,) the pool slot of each row (None: row b is slot b of a pool of `size`)
    tokens: Tensor  # (size,) the input of the next step
    uniform: Tensor  # (size,) one uniform number per row for sampling
    seen: Tensor | None  # (size, V) tokens seen, for the repetition penalty
    out: Tensor  # (size,) the tokens of the last step
    graph: torch.cuda.CUDAGraph | None = None


class Decoder:
    """Decoding for one model and one set of sampling options; reuse it across calls (graphs are kept)."""

    def __init__(
        self,
        model: BlackMamba,
        options: SamplingOptions,
        use_graphs: bool | None = None,
        buckets: bool | None = None,
        pool: InferenceCache | None = None,
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
        self._buckets: dict[int, _Bucket] = {}
        self.pool = pool

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

    def _pool(self, size: int) -> tuple[InferenceCache, Tensor | None]:
        """The pool of a bucket of ``size`` rows and the bucket's slot buffer (every row on the pad slot)."""
        model, device = self.model, self.model.device
        pool = self.pool
        if pool is None and not self.buckets:
            return model.allocate_cache(size, device=device), None
        if pool is None:
            pool = model.allocate_cache(size + 1, device=device)
        elif pool.n_slots < size + 1:
            raise ValueError(f"a batch of {size} rows needs a pool of {size + 1} slots (one pad), got {pool.n_slots}")
        return pool, torch.full((size,), pool.n_slots - 1, dtype=torch.long, device=device)

    def _bucket(self, size: int) -> _Bucket:
        if size in self._buckets:
            return self._buckets[size]
        device = self.model.device
        vocab = self.model.config.vocab_size
        pool, slots = self._pool(size)
        bucket = _Bucket(
            size=size,
            pool=pool,
            slots=slots,
            tokens=torch.zeros(size, dtype=torch.long, device=device),
            uniform=torch.zeros(size, device=device),
            seen=None
            if self.options.repetition_penalty is None
            else torch.zeros(size, vocab, dtype=torch.bool, device=device),
            out=torch.zeros(size, dtype=torch.long, device=device),
        )
        if self.use_graphs:
            # Warm up on a side stream (kernels compile, the allocator settles), then capture. Every row is on
            # the pad slot until start() assigns the real ones, so the warm-up touches no other bucket's state.
            with torch.inference_mode():
                warm_up_on_side_stream(lambda: self._step(bucket), device)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph), torch.inference_mode():
                self._step(bucket)
        self._buckets[size] = bucket
        return bucket

    def _step(self, bucket: _Bucket) -> None:
        logits = self.model.step(bucket.tokens, bucket.pool, bucket.slots)
        tokens = self.process(logits, bucket.seen, bucket.uniform)
        bucket.out.copy_(tokens)
        bucket.tokens.copy_(tokens)
        if bucket.seen is not None:
            bucket.seen.scatter_(1, tokens[:, None], True)

    @torch.inference_mode()
    def start(self, cache: InferenceCache, tokens: Tensor, seen: Tensor | None, slots: Tensor | None = None) -> _Bucket:
        """Load a prefilled ``cache`` (one slot per row of the batch), the first sampled ``tokens`` (B,) and
        ``seen`` (B, V) into a bucket: row b decodes in slot ``slots[b]`` of the bucket's pool (slot b by
        default), rows beyond the batch in its pad slot (zeroed)."""
        batch = tokens.shape[0]
        bucket = self._bucket(self.bucket(batch) if self.buckets else batch)
        slots = torch.arange(batch) if slots is None else slots
        if bucket.slots is None:
            bucket.pool.write(slots, cache)
        else:
            pad = bucket.pool.n_slots - 1
            bucket.slots.fill_(pad)
            bucket.slots[:batch].copy_(slots)
            bucket.pool.reset(pad)
            bucket.pool.write(bucket.slots[:batch], cache)
        bucket.tokens.zero_()
        bucket.tokens[:batch].copy_(tokens)
        if bucket.seen is not None:
            bucket.seen.zero_()
            bucket.seen[:batch].copy_(seen)
        return bucket

    @torch.inference_mode()
    def step(self, bucket: _Bucket, uniform: Tensor | None) -> Tensor:
        """One token for every row of ``bucket``: returns the new tokens (size,) on the device."""
        if uniform is not None:
            bucket.uniform[: uniform.shape[0]].copy_(uniform)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._step(bucket)
        return bucket.out


_DECODERS: weakref.WeakKeyDictionary[BlackMamba, dict] = weakref.WeakKeyDictionary()


def _weights_key(model: BlackMamba) -> tuple:
    """What a captured graph depends on: where every parameter lives, its dtype, and the mode. Casting or
    moving the model (new parameter storage) must not replay a graph that reads the old storage."""
    return (model.training, tuple((p.data_ptr(), p.dtype) for p in model.parameters()))


def decoder_for(model: BlackMamba, options: SamplingOptions, use_graphs: bool | None = None) -> Decoder:
    """The model's decoder for these options, created on first use and kept (with its graphs) while the
    parameters stay where they are; the EOS and the seed do not matter to it. A model in training mode
    decodes eagerly (its routing may sync)."""
    if model.training:
        use_graphs = False
    options = options.logits_only()
    weights = _weights_key(model)
    per_model = _DECODERS.get(model)
    if per_model is None or per_model.get("weights") != weights:
        per_model = {"weights": weights}
        _DECODERS[model] = per_model
    key = (options, use_graphs)
    if key not in per_model:
        per_model[key] = Decoder(model, options, use_graphs)
    return per_model[key]
