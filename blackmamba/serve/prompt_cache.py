"""The exact prompt-state cache: recurrent states at fixed token boundaries and at prompt ends, in an LRU.

A Mamba model's whole memory of a prefix is its state, a few MB whatever the prefix length, so a prompt that
starts with a prefix seen before can start from that prefix's state and prefill only the rest. This cache
keeps states at every ``interval``-th token (256 by default) and at the end of each prompt, keyed by a hash of
the token prefix (a chain: the key at boundary k hashes the key at k-1 with the tokens in between), and
evicts the least recently used entries to stay within a budget in bytes.

Exactness. The server prefills every prompt in chunks that end on the same grid of ``interval`` positions
(or at the prompt end), so the state at a boundary is the same number, bit for bit, whether it was computed
now or restored from the cache, and the chunks after it are the same computation (for chunks prefilled alone:
one batched with other prompts' chunks may round differently; see :mod:`.scheduler`). Resuming at the end of an
earlier, shorter prompt would split a chunk at a new place, which changes the rounding of a chunked scan, so
a prompt-end entry serves only the identical prompt (it also stores the last position's logits, so such a hit
needs no forward at all); longer prompts resume at the last boundary they share.

Counters follow vLLM's prefix-cache metrics: ``queries`` and ``hits`` count prompt tokens (looked up, and
served from the cache).
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .engine import Snapshot


@dataclass(frozen=True)
class CacheEntry:
    length: int  # prompt tokens the state has consumed
    state: Snapshot
    logits: Tensor | None  # (V,) after the last consumed token, when kept (prompt ends)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else self.logits.numel() * self.logits.element_size()
        return self.state.nbytes + extra


def _digest(previous: bytes, tokens: Sequence[int], tag: bytes) -> bytes:
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(array("q", tokens).tobytes())
    h.update(tag)
    return h.digest()


class PrefixKeys:
    """The keys of one prompt's boundaries, computed once: ``boundary(k)`` for the first k * interval tokens,
    ``end`` for the whole prompt."""

    def __init__(self, tokens: Sequence[int], interval: int) -> None:
        self.interval = interval
        self.length = len(tokens)
        self._boundaries = [b""]
        for start in range(0, self.length - interval + 1, interval):
            self._boundaries.append(_digest(self._boundaries[-1], tokens[start : start + interval], b"b"))
        tail_start = (len(self._boundaries) - 1) * interval
        self.end = (
            self._boundaries[-1]
            if tail_start == self.length
            else _digest(self._boundaries[-1], tokens[tail_start:], b"e%d" % self.length)
        )

    def boundary(self, k: int) -> bytes:
        return self._boundaries[k]

    @property
    def n_boundaries(self) -> int:
        return len(self._boundaries) - 1


class PromptCache:
    """LRU of :class:`CacheEntry` bounded by ``capacity_bytes`` (0 disables the cache). Thread-safe."""

    def __init__(self, capacity_bytes: int, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"the prompt-cache interval must be >= 1 token, got {interval}")
        self.capacity_bytes = capacity_bytes
        self.interval = interval
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens served from the cache

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: PrefixKeys) -> CacheEntry | None:
        """The longest usable entry for a prompt: its own end (with logits), else its last cached boundary
        strictly before the end. Counts the query and the hit."""
        if not self.enabled:
            return None
        with self._lock:
            self.queries += keys.length
            candidates = [keys.end] + [keys.boundary(k) for k in range((keys.length - 1) // self.interval, 0, -1)]
            for key in candidates:
                entry = self._entries.get(key)
                if entry is not None and (entry.length < keys.length or entry.logits is not None):
                    self._entries.move_to_end(key)
                    self.hits += entry.length
                    return entry
            return None

    def contains(self, key: bytes, with_logits: bool = False) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and (entry.logits is not None or not with_logits)

    def insert(self, key: bytes, entry: CacheEntry) -> None:
        """Add (or refresh) an entry, evicting the least recently used until the budget holds."""
        if not self.enabled or entry.nbytes > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
                if old.logits is not None and entry.logits is None:
                    entry = old
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
