"""What the scheduler needs from the model: a fixed pool of per-stream recurrent states, and three operations.

A Mamba state has the same size whatever the length of the sequence, so a stream's whole memory is one slot
of the model's state pool (:class:`~blackmamba.model.InferenceCache`), allocated once. The scheduler talks to
the model only through :class:`PoolEngine`:

- ``acquire()`` / ``release(slot)``: take a zeroed slot for a new stream, give it back when the stream ends;
- ``prefill(slot, ids)``: run a piece of a prompt into the slot (continuing from what it holds), returning
  the logits of the last position (or of every position, for prompt log-probabilities);
- ``prefill_batch(slots, chunks)``: the same for several slots in one forward (left-padded where the chunks
  differ in length, which only a slot holding a zero state, a prompt's first chunk, may be);
- ``decode(slots, tokens)``: one token for each of any set of slots, in one batched step;
- ``set_next_tokens(slots, tokens)`` / ``next_tokens(slots)``: each slot's next input token, kept on the
  device, so a step's sampled tokens feed the next step without a trip through the host;
- ``snapshot(slot)`` / ``restore(slot, snapshot)``: copy one slot's state out and back (the prompt cache).

The decode step runs over the pool with the slot of each row as an index (``model.step(tokens, pool,
slots)``), each row exactly as if it ran alone, so a stream's tokens do not depend on what shares the step.
On a GPU the step is captured in a CUDA graph per batch bucket (1, 2, 4, ... up to the pool's capacity), as
the offline decoder does: rows beyond the batch decode the pool's pad slot (its last, never handed out, zeroed
inside the graph at every step). Logit processing and sampling stay outside the graph, because the requests
of one step each have their own sampling options.

Prefill: on a GPU an eager forward is bound by the host launching its kernels, whatever its batch, so the
scheduler batches the prompt chunks of an iteration into as few forwards as it can, and with graphs on, the
forwards replay CUDA graphs per batch and length bucket (:mod:`~blackmamba.generation.prefill_graphs`, as
offline generation does): a chunk into slots that still hold the zero state of :meth:`acquire` is padded to
its bucket, a chunk that continues a state is replayed only when its length is a bucket (a full chunk of
the prompt cache's grid at the default interval) and runs eagerly otherwise. A batched forward computes
each row as the model does in a batch (see the scheduler on what that means for exactness).

Nothing here reads from the device: slot indices go to the device through pinned memory without waiting,
and the logits stay there, so the scheduler's one read per step is the sampled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..generation.decoder import BUCKETS, Decoder, warm_up_on_side_stream
from ..generation.generate import _left_pad_host
from ..generation.prefill_graphs import PrefillGraphs
from ..model import BlackMamba, InferenceCache


@dataclass(frozen=True)
class Snapshot:
    """One stream's recurrent state copied out of the pool (a cache of one slot), and its size in bytes."""

    state: InferenceCache | None
    nbytes: int


@dataclass
class _Graph:
    """The static buffers of one bucket's captured decode step."""

    size: int
    tokens: Tensor  # (size,)
    slots: Tensor  # (size,)
    logits: Tensor | None = None  # (size, V), written by the graph
    graph: torch.cuda.CUDAGraph | None = None


class PoolEngine:
    """A pool of ``capacity`` stream states for one model, on the model's device (see the module docstring).
    ``cuda_graphs``: capture the decode step (default: on a GPU).

    Every method must run under ``torch.inference_mode()`` in the scheduler's thread."""

    def __init__(self, model: BlackMamba, capacity: int, cuda_graphs: bool | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"the pool needs at least one slot, got {capacity}")
        on_gpu = model.device.type == "cuda"
        if cuda_graphs and not on_gpu:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        self.model = model
        self.capacity = capacity
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.cuda_graphs = on_gpu if cuda_graphs is None else cuda_graphs
        with torch.inference_mode():
            self.pool = model.allocate_cache(capacity + 1, device=self.device)
        self.pad = capacity  # the last slot: where padding rows of a graph bucket decode
        self._free = list(range(capacity))
        self._next = torch.zeros(capacity + 1, dtype=torch.long, device=self.device)
        self._slot_ids: dict[tuple[int, ...], Tensor] = {}
        self.state_bytes = sum(t[0].numel() * t.element_size() for t in self.pool.tensors())
        self._graphs: dict[int, _Graph] = {}
        self._prefill = PrefillGraphs(model, True) if self.cuda_graphs else None
        self._zeroed: set[int] = set()  # slots still holding the zero state of acquire()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _ids(self, slots: Sequence[int]) -> Tensor:
        # The same few sets of slots recur from step to step (the decoding streams): keep their index tensors.
        key = tuple(slots)
        ids = self._slot_ids.get(key)
        if ids is None:
            if len(self._slot_ids) >= 8:
                self._slot_ids.clear()
            ids = self._slot_ids[key] = self.to_device(key)
        return ids

    def to_device(self, values: Sequence[int]) -> Tensor:
        """A long tensor of ``values`` on the pool's device, copied without waiting for the device."""
        return self._to_device(torch.tensor(list(values), dtype=torch.long))

    def _to_device(self, t: Tensor) -> Tensor:
        # A plain copy from pageable memory waits for the whole stream; from pinned memory it is queued.
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def acquire(self) -> int:
        """A free slot with a zeroed state; the lowest index."""
        if not self._free:
            raise RuntimeError("no free slot in the state pool")
        self._free.sort()
        slot = self._free.pop(0)
        self.pool.reset(slot)
        self._zeroed.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.capacity:
            raise RuntimeError(f"slot {slot} is not in use")
        self._free.append(slot)

    def prefill(self, slot: int, ids: Sequence[int], all_logits: bool = False) -> Tensor:
        """Run ``ids`` into ``slot`` after what it holds; logits (V,) of the last position, or (L, V) of all."""
        if self._prefill is not None and not all_logits:
            return self._prefill_graphed([slot], [ids])[0]
        self._zeroed.discard(slot)
        x = self._to_device(torch.tensor([list(ids)], dtype=torch.long))
        out = self.model(x, cache=self.pool, slots=self._ids([slot]), num_last_tokens=0 if all_logits else 1)
        return out.logits[0] if all_logits else out.logits[0, -1]

    def prefill_batch(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> Tensor:
        """Run ``chunks[i]`` into ``slots[i]``, all in one forward; logits (n, V) of each chunk's last token.

        Chunks of different lengths are left-padded and masked; padding in front of a state's history would
        change it, so a shorter chunk's slot must hold a zero state (a prompt's first chunk). One chunk is
        exactly :meth:`prefill`."""
        if len(slots) != len(chunks) or not chunks:
            raise ValueError(f"prefill_batch needs one chunk per slot, got {len(slots)} slots and {len(chunks)} chunks")
        if len(chunks) == 1:
            return self.prefill(slots[0], chunks[0])[None]
        if self._prefill is not None:
            return self._prefill_graphed(slots, chunks)
        self._zeroed.difference_update(slots)
        length = max(len(c) for c in chunks)
        ids = torch.zeros(len(chunks), length, dtype=torch.long)
        mask = torch.zeros(len(chunks), length, dtype=torch.bool)
        for i, chunk in enumerate(chunks):
            ids[i, length - len(chunk) :] = torch.tensor(list(chunk), dtype=torch.long)
            mask[i, length - len(chunk) :] = True
        padded = not bool(mask.all())
        out = self.model(
            self._to_device(ids),
            cache=self.pool,
            mask=self._to_device(mask) if padded else None,
            slots=self._ids(slots),
            num_last_tokens=1,
        )
        return out.logits[:, -1]

    def _prefill_graphed(self, slots: Sequence[int], chunks: Sequence[Sequence[int]]) -> Tensor:
        """The chunks through the prefill graphs; padded in front only where every slot holds a zero state."""
        fresh = all(s in self._zeroed for s in slots)
        self._zeroed.difference_update(slots)
        ids, mask = _left_pad_host(chunks)
        return self._prefill.run(ids, self.pool, mask, slots=self._ids(slots), fresh=fresh)

    def set_next_tokens(self, slots: Sequence[int], tokens: Tensor) -> None:
        """Record ``tokens`` (n,), on the device, as the next input of ``slots``."""
        self._next.index_copy_(0, self._ids(slots), tokens)

    def next_tokens(self, slots: Sequence[int]) -> Tensor:
        """The next input token of each of ``slots`` (n,), on the device."""
        return self._next.index_select(0, self._ids(slots))

    def decode(self, slots: Sequence[int], tokens: Tensor) -> Tensor:
        """One step for each of ``slots`` fed ``tokens`` (n,) -> logits (n, V); the states advance in place."""
        if not self.cuda_graphs:
            return self.model.step(tokens, self.pool, self._ids(slots))
        n = len(slots)
        g = self._graph(bucket_size(n, self.capacity))
        g.tokens.zero_()
        g.tokens[:n].copy_(tokens)
        g.slots.fill_(self.pad)
        g.slots[:n].copy_(self._ids(slots))
        g.graph.replay()
        return g.logits[:n]

    def _step(self, g: _Graph) -> None:
        for t in self.pool.tensors():  # the pad slot starts every step from zero: padding never drifts
            t[self.pad].zero_()
        logits = self.model.step(g.tokens, self.pool, g.slots)
        if g.logits is None:
            g.logits = torch.empty_like(logits)
        g.logits.copy_(logits)

    def _graph(self, size: int) -> _Graph:
        if size in self._graphs:
            return self._graphs[size]
        g = _Graph(
            size,
            torch.zeros(size, dtype=torch.long, device=self.device),
            torch.full((size,), self.pad, dtype=torch.long, device=self.device),
        )
        # Warm up on a side stream (kernels compile, the allocator settles), then capture; every row is on the
        # pad slot meanwhile, so no stream's state is touched.
        warm_up_on_side_stream(lambda: self._step(g), self.device)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph):
            self._step(g)
        self._graphs[size] = g
        return g

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture the decode graph of every bucket now, so that no request waits for a capture."""
        if self.cuda_graphs:
            for size in sorted({bucket_size(n, self.capacity) for n in (*BUCKETS, self.capacity)}):
                if size <= self.capacity:
                    self._graph(size)

    def snapshot(self, slot: int) -> Snapshot:
        return Snapshot(self.pool.snapshot(slot), self.state_bytes)

    def restore(self, slot: int, snapshot: Snapshot) -> None:
        self._zeroed.discard(slot)
        self.pool.restore(slot, snapshot.state)


def bucket_size(batch: int, capacity: int) -> int:
    """The smallest bucket of :data:`~blackmamba.generation.decoder.BUCKETS` holding ``batch`` rows, capped at
    the pool's capacity (a pool of 48 slots steps 33..48 rows in a bucket of 48)."""
    return min(Decoder.bucket(batch), capacity)
