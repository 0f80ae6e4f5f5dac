"""Prefill replayed from CUDA graphs, one per (batch bucket, length bucket), so the host launches no kernels.

An eager prefill forward of the 2.8B shape is about a thousand kernel launches, and at one prompt of 2K
tokens the host issuing them takes longer than the GPU running them. Here the forward runs on static
buffers (ids, mask, the decode state, the logits) whose shapes come from a few buckets, so each shape is
captured once and replayed:

* batch: the decode buckets (1, 2, 4, ... 256, :data:`.decoder.BUCKETS`); rows beyond the batch run on
  token 0 and are never read (every op treats rows independently);
* length: powers of two from ``min_length`` up to ``step``, then multiples of ``step`` up to ``max_length``
  (16, 32, 64, 128, 256, 384, ... 2048 by default). Short prompts pad by at most 2x (their forward costs
  about its weight reads anyway); longer ones by fewer than ``step`` positions (< 6% at 2K), with 19 shapes
  in all, each captured only when first used.

Padding is exact by construction: a prompt is left-padded and masked, and a masked position feeds zeros
to the conv and nothing to a zero SSM state, so a row gets exactly the state it would get alone (see
:mod:`blackmamba.layers.mamba`). That holds only while a row's state is still zero, so extra padding goes
in front of a call's first chunk only, and only when the call starts from zero states (``fresh``).
A prompt longer than ``max_length`` runs as chunks with the state carried: the first chunk takes the
remainder, padded to its bucket, and every later chunk is a full ``max_length``. With an explicit chunk
size, or when the call continues from a state, a chunk whose length is not a bucket runs eagerly on the
same buffers (:func:`plan` decides, chunk by chunk).

The state of a batch bucket lives in a cache of its own (two flat buffers, zeroed in two launches); the
caller's cache gets the rows copied out at the end (into ``slots`` of a pool when given), and a call that
continues from a state copies the rows in first. Graphs share one memory pool; each graph's inputs and
outputs are allocated outside its capture, so the pool holds only intermediates and graphs may replay in
any order. Graphs are captured lazily, before the call touches the state (warm-up on a side stream
first), kept least-recently-used up to ``max_graphs``, and only up to ``max_tokens`` tokens per forward
(beyond, the call runs as the plain eager prefill).

The forward of the Mamba and MoE blocks in eval mode reads nothing back to the host (the MoE sorts tokens
and finds expert offsets on the device and counts with ``index_add_``; the scan's segment split depends on
shapes only), so it can be captured. Models with attention blocks (whose prefill sizes the KV read from the
host) and models in training mode run the plain prefill.

Without graphs (``use_graphs=False``) the same buckets, padding and chunks run eagerly on the same
buffers: that twin is what the CPU tests compare with the plain prefill, and a captured replay computes
exactly what it does.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from ..model import BlackMamba, InferenceCache
from .decoder import Decoder, _weights_key, warm_up_on_side_stream
from .sampling import GenerationError, check_prefill_chunk_size

# Default cap on the tokens of one captured forward (64 x 2048); its intermediates stay in the graph pool.
MAX_TOKENS = 64 * 2048
MAX_GRAPHS = 32


@dataclass(frozen=True)
class PrefillBuckets:
    """Prompt lengths a forward is captured for: powers of two from ``min_length`` below ``step``, then the
    multiples of ``step`` up to ``max_length`` (the longest chunk)."""

    min_length: int = 16
    step: int = 128
    max_length: int = 2048

    def __post_init__(self) -> None:
        for name in ("min_length", "step", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"prefill buckets: {name} must be an int >= 1, got {value!r}", name)
        if self.min_length > self.step or self.max_length % self.step:
            raise GenerationError(
                f"prefill buckets: want min_length <= step and max_length a multiple of step, got "
                f"{self.min_length}, {self.step}, {self.max_length}",
                "max_length",
            )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        small, n = [], self.min_length
        while n < self.step:
            small.append(n)
            n *= 2
        return (*small, *range(self.step, self.max_length + 1, self.step))

    def bucket(self, length: int) -> int:
        """The smallest bucket holding ``length`` positions (at most ``max_length``)."""
        if not 1 <= length <= self.max_length:
            raise GenerationError(f"prefill buckets: length {length} is outside [1, {self.max_length}]", "length")
        return next(s for s in self.sizes if s >= length)


@dataclass(frozen=True)
class Chunk:
    """One forward of a prefill: ``size`` columns of the left-padded ids from ``start``, run as ``width``
    columns (``width - size`` more padding in front: a bucket), replayed from a graph when ``graphed``;
    ``masked`` when some row has padding in it."""

    start: int
    size: int
    width: int
    graphed: bool
    masked: bool


def plan(
    lengths: Sequence[int], buckets: PrefillBuckets, fresh: bool = True, chunk_size: int | None = None
) -> list[Chunk]:
    """The chunks that prefill rows of ``lengths`` (left-padded to the longest, L): chunks of ``chunk_size``
    from the left, or by default the remainder of L modulo ``max_length`` then full ``max_length`` chunks.

    Extra padding (to a bucket) only goes in front of the first chunk of a ``fresh`` call (every row starts
    from a zero state, none has started yet); a later chunk, or any chunk of a call that continues from a
    state, is graphed only when its length is a bucket, and otherwise runs eagerly at its own length."""
    if not lengths or min(lengths) < 1:
        raise GenerationError(f"prefill: every row needs at least one token, got lengths {list(lengths)}", "prompts")
    check_prefill_chunk_size(chunk_size)
    longest, shortest = max(lengths), min(lengths)
    m = buckets.max_length
    if chunk_size is None:
        full = (longest - 1) // m
        sizes = [longest - full * m] + [m] * full
    else:
        sizes = [chunk_size] * (longest // chunk_size) + ([longest % chunk_size] if longest % chunk_size else [])
    chunks, start = [], 0
    for size in sizes:
        padded_rows = start < longest - shortest  # left padding of the shorter rows reaches into this chunk
        if size > m:
            width, graphed = size, False
        elif fresh and start == 0:
            width, graphed = buckets.bucket(size), True
        else:
            width, graphed = size, size in buckets.sizes
        chunks.append(Chunk(start, size, width, graphed, padded_rows or width > size))
        start += size
    return chunks


def _flat_cache(model: BlackMamba, n_slots: int, device: torch.device) -> tuple[InferenceCache, list[Tensor]]:
    """A cache of ``n_slots`` whose tensors are views of one flat buffer per dtype (zeroed in one launch each)."""
    proto = model.allocate_cache(n_slots, device=torch.device("meta"))
    sizes: dict[torch.dtype, int] = {}
    for t in proto.tensors():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    flats = {dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)

    def view(t: Tensor) -> Tensor:
        at = offsets[t.dtype]
        offsets[t.dtype] = at + t.numel()
        return flats[t.dtype][at : at + t.numel()].view(t.shape)

    def views(state):
        return dataclasses.replace(state, **{f.name: view(getattr(state, f.name)) for f in dataclasses.fields(state)})

    layers = [None if s is None else views(s) for s in proto.layers]
    return InferenceCache(layers), list(flats.values())


@dataclass
class _State:
    """The decode state of one batch bucket during a prefill."""

    cache: InferenceCache
    flats: list[Tensor]

    def zero(self) -> None:
        for t in self.flats:
            t.zero_()


@dataclass
class _Entry:
    """The static inputs and output of one (batch, width, masked) forward, and its graph once captured."""

    ids: Tensor  # (b, width)
    mask: Tensor | None  # (b, width)
    logits: Tensor | None = None  # (b, V) of the last position, allocated by the first forward
    graph: torch.cuda.CUDAGraph | None = None
    failed: bool = False  # the capture failed: this shape runs eagerly


@dataclass
class PrefillGraphs:
    """Bucketed prefill for one model, replayed from CUDA graphs (``use_graphs``, default: on a GPU) or run
    eagerly on the same buffers. One prefill at a time; reuse it across calls (graphs and buffers are kept)."""

    model: BlackMamba
    use_graphs: bool | None = None
    buckets: PrefillBuckets = field(default_factory=PrefillBuckets)
    max_graphs: int = MAX_GRAPHS
    max_tokens: int = MAX_TOKENS
    _states: dict[int, _State] = field(default_factory=dict, init=False, repr=False)
    _entries: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _pool: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        on_gpu = self.model.device.type == "cuda"
        if self.use_graphs and not on_gpu:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.model.device}")
        self.use_graphs = on_gpu if self.use_graphs is None else self.use_graphs
        if self.max_graphs < 0 or self.max_tokens < 1:
            raise GenerationError(
                f"prefill graphs: want max_graphs >= 0 and max_tokens >= 1, got {self.max_graphs}, {self.max_tokens}",
                "max_graphs",
            )

    @property
    def num_graphs(self) -> int:
        return sum(e.graph is not None for e in self._entries.values())

    def supports(self, model_batch: int, chunks: Sequence[Chunk]) -> bool:
        """Whether this prefill runs bucketed (else the plain eager prefill): an eval model without attention
        blocks, and no forward above ``max_tokens`` tokens."""
        if self.model.training or "attention" in self.model.config.layer_pattern:
            return False
        rows = Decoder.bucket(model_batch)
        return all(rows * c.width <= self.max_tokens for c in chunks)

    def clear(self) -> None:
        """Drop every graph and buffer (their memory goes back to PyTorch's allocator)."""
        self._entries.clear()
        self._states.clear()
        self._pool = None

    @torch.inference_mode()
    def run(
        self,
        ids: Tensor,
        cache: InferenceCache,
        mask: Tensor | None = None,
        slots: Tensor | None = None,
        fresh: bool = True,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Prefill the left-padded prompts ``ids`` (B, L) (``mask`` (B, L) marks real tokens) into ``cache``
        (``slots`` (B,) of a pool, on its device; rows 0..B-1 of a cache of B slots without); returns the
        logits of the last position (B, V). ``ids`` and ``mask`` should be on the host (their lengths are
        read there). ``fresh``: the rows' states in ``cache`` are zero (a new cache, slots just acquired), so
        padding may go in front; else they continue from those states (rows with padding must hold zero
        states, as for the plain prefill)."""
        ids = ids.cpu()
        mask = None if mask is None else mask.cpu()
        batch, length = ids.shape
        lengths = [length] * batch if mask is None else mask.sum(1).tolist()
        chunks = plan(lengths, self.buckets, fresh, chunk_size)
        if not self.supports(batch, chunks):
            return self._plain(ids, mask, cache, slots, chunk_size)
        rows = Decoder.bucket(batch)
        entries = [self._entry(rows, c.width, c.masked) if c.graphed else None for c in chunks]  # captures first
        state = self._state(rows)
        state.zero()
        if not fresh:
            for dst, src in zip(state.cache.tensors(), cache.tensors(), strict=True):
                dst[:batch].copy_(src[:batch] if slots is None else src.index_select(0, slots))
        dev_ids, dev_mask = self._inputs(ids, mask, rows, chunks[0].width - chunks[0].size)
        col = 0
        for chunk, entry in zip(chunks, entries, strict=True):
            cols = slice(col, col + chunk.width)
            col += chunk.width
            if entry is None:
                part_mask = dev_mask[:, cols] if chunk.masked else None
                out = self.model(dev_ids[:, cols], cache=state.cache, mask=part_mask, num_last_tokens=1)
                logits = out.logits[:, -1]
                continue
            entry.ids.copy_(dev_ids[:, cols])
            if entry.mask is not None:
                entry.mask.copy_(dev_mask[:, cols])
            if entry.graph is not None:
                entry.graph.replay()
            else:
                self._forward(entry, state)
            logits = entry.logits
        for dst, src in zip(cache.tensors(), state.cache.tensors(), strict=True):
            if slots is None:
                dst.copy_(src[:batch])
            else:
                dst.index_copy_(0, slots, src[:batch].to(dst.dtype))
        return logits[:batch].clone()

    def _plain(
        self, ids: Tensor, mask: Tensor | None, cache: InferenceCache, slots: Tensor | None, chunk_size: int | None
    ) -> Tensor:
        device = self.model.device
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        chunk = chunk_size or ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            part_mask = None if mask is None else mask[:, start : start + chunk]
            out = self.model(ids[:, start : start + chunk], cache=cache, mask=part_mask, num_last_tokens=1, slots=slots)
        return out.logits[:, -1]

    def _inputs(self, ids: Tensor, mask: Tensor | None, rows: int, pad: int) -> tuple[Tensor, Tensor]:
        """ids and mask (rows, pad + L) on the device: ``pad`` more padding in front, rows beyond the batch
        all padding (token 0)."""
        batch, length = ids.shape
        host_ids = torch.zeros(rows, pad + length, dtype=torch.long)
        host_mask = torch.zeros(rows, pad + length, dtype=torch.bool)
        host_ids[:batch, pad:] = ids
        host_mask[:batch, pad:] = True if mask is None else mask
        device = self.model.device
        if device.type != "cuda":
            return host_ids, host_mask
        # From pinned memory the copies are queued behind the device's work instead of waiting for it.
        return host_ids.pin_memory().to(device, non_blocking=True), host_mask.pin_memory().to(device, non_blocking=True)

    def _state(self, rows: int) -> _State:
        if rows not in self._states:
            self._states[rows] = _State(*_flat_cache(self.model, rows, self.model.device))
        return self._states[rows]

    def _forward(self, entry: _Entry, state: _State) -> None:
        logits = self.model(entry.ids, cache=state.cache, mask=entry.mask, num_last_tokens=1).logits[:, -1]
        if entry.logits is None:  # the first (warm-up) call allocates the output, outside any capture
            entry.logits = logits.clone()
        else:
            entry.logits.copy_(logits)

    def _entry(self, rows: int, width: int, masked: bool) -> _Entry:
        key = (rows, width, masked)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        device = self.model.device
        entry = _Entry(
            ids=torch.zeros(rows, width, dtype=torch.long, device=device),
            mask=torch.ones(rows, width, dtype=torch.bool, device=device) if masked else None,
        )
        while self._entries and len(self._entries) >= max(self.max_graphs, 1):
            self._entries.popitem(last=False)
        if self.use_graphs and self.max_graphs > 0:
            self._capture(entry, self._state(rows))
        self._entries[key] = entry
        return entry

    def _capture(self, entry: _Entry, state: _State) -> None:
        """Warm up on a side stream (kernels compile, the allocator settles), then capture into the shared pool.
        Runs before a call touches its state, so the warm-up's writes to the state are harmless."""
        device = self.model.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        warm_up_on_side_stream(lambda: self._forward(entry, state), device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(entry, state)
        except RuntimeError as exc:  # an op that synchronises: keep the shape, run it eagerly
            entry.failed = True
            warnings.warn(f"prefill graph capture failed, running this shape eagerly: {exc}", stacklevel=3)
            return
        entry.graph = graph


_PREFILLS: weakref.WeakKeyDictionary[BlackMamba, dict] = weakref.WeakKeyDictionary()


def prefill_graphs_for(model: BlackMamba, use_graphs: bool | None = None) -> PrefillGraphs:
    """The model's :class:`PrefillGraphs`, created on first use and kept (with its graphs) while the
    parameters stay where they are (moving or casting the model starts afresh)."""
    weights = _weights_key(model)
    per_model = _PREFILLS.get(model)
    if per_model is None or per_model.get("weights") != weights:
        per_model = {"weights": weights}
        _PREFILLS[model] = per_model
    if use_graphs not in per_model:
        per_model[use_graphs] = PrefillGraphs(model, use_graphs)
    return per_model[use_graphs]


def clear_prefill_graphs(model: BlackMamba) -> None:
    """Drop the prefill graphs kept for ``model`` (their memory goes back to PyTorch's allocator)."""
    for value in (_PREFILLS.pop(model, None) or {}).values():
        if isinstance(value, PrefillGraphs):
            value.clear()
