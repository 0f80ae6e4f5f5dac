"""The state pool, the prompt cache and the scheduler, without HTTP."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from blackmamba import generate
from blackmamba.serve.engine import PoolEngine
from blackmamba.serve.metrics import ServerMetrics
from blackmamba.serve.prompt_cache import CacheEntry, PrefixKeys, PromptCache
from blackmamba.serve.scheduler import Delta, Failed, Finished, QueueFull, SamplingParams, Scheduler

from .conftest import INTERVAL


def prompts(n: int, seed: int = 0, low: int = 2, high: int = 70) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(0, 300, (k,), generator=g).tolist() for k in lengths]


def test_decode_over_any_set_of_slots_equals_each_alone(model):
    engine = PoolEngine(model, 5)
    ps = prompts(3, seed=1)
    usable = model.config.tokenizer_vocab_size  # generate never picks the embedding's padding rows
    with torch.inference_mode():
        slots = [engine.acquire() for _ in range(5)]
        used = [slots[0], slots[2], slots[4]]  # not contiguous: the gathered path
        firsts = [int(engine.prefill(s, p)[:usable].argmax()) for s, p in zip(used, ps, strict=True)]
        tokens = torch.tensor(firsts)
        steps = []
        for _ in range(6):
            tokens = engine.decode(used, tokens)[:, :usable].argmax(-1)
            steps.append(tokens.tolist())
    together = [[f, *(s[i] for s in steps)] for i, f in enumerate(firsts)]
    assert together == [generate(model, [p], 7)[0] for p in ps]
    assert len({tuple(t) for t in together}) == 3


def test_snapshot_restore_is_bit_exact_and_slots_are_reset(model):
    engine = PoolEngine(model, 2)
    p = prompts(1, seed=2, low=40)[0]
    with torch.inference_mode():
        a = engine.acquire()
        engine.prefill(a, p[:INTERVAL])
        snap = engine.snapshot(a)
        want = engine.prefill(a, p[INTERVAL:])
        engine.release(a)
        b = engine.acquire()
        assert b == a  # the lowest free slot, zeroed: a fresh prefill must not see the old state
        fresh = engine.prefill(b, p[INTERVAL:])
        engine.restore(b, snap)
        resumed = engine.prefill(b, p[INTERVAL:])
    assert torch.equal(resumed, want)
    assert not torch.equal(fresh, want)
    assert snap.nbytes == engine.state_bytes > 0


def entry(length: int, nbytes_logits: int = 0) -> CacheEntry:
    from blackmamba.serve.engine import Snapshot

    logits = torch.randn(nbytes_logits // 4) if nbytes_logits else None
    return CacheEntry(length, Snapshot(None, 1000), logits)


def test_prefix_keys_chain_over_the_token_prefix():
    a = PrefixKeys(list(range(40)), 16)
    b = PrefixKeys([*range(32), 99, 98], 16)
    c = PrefixKeys([1, *range(1, 40)], 16)
    assert a.n_boundaries == 2 and b.n_boundaries == 2
    assert a.boundary(1) == b.boundary(1) and a.boundary(2) == b.boundary(2)
    assert a.end != b.end and a.boundary(1) != c.boundary(1)
    assert PrefixKeys(list(range(32)), 16).end == a.boundary(2)


def test_prompt_cache_lookup_rules_and_lru_by_bytes():
    cache = PromptCache(capacity_bytes=3500, interval=16)
    long = PrefixKeys(list(range(50)), 16)
    cache.insert(long.boundary(1), entry(16))
    cache.insert(long.boundary(2), entry(32))
    cache.insert(long.end, entry(50, 400))
    # The identical prompt resumes at its end; a longer one at its last shared boundary, never at the end of
    # the shorter prompt (that would split a prefill chunk where an uncached run does not).
    assert cache.lookup(long).length == 50
    longer = PrefixKeys([*range(50), 7, 7], 16)
    assert cache.lookup(longer).length == 48 - 16  # boundary 3 (48) is not cached: boundary 2
    assert (cache.queries, cache.hits) == (50 + 52, 50 + 32)
    # A prompt ending exactly on a cached boundary that has no logits resumes one boundary earlier.
    assert cache.lookup(PrefixKeys(list(range(32)), 16)).length == 16
    # Bytes: 1000 + 1000 + 1400 = 3400; one more state evicts the least recently used: the prompt end (the
    # lookups since touched boundary 2, then boundary 1).
    other = PrefixKeys([5] * 20, 16)
    cache.insert(other.boundary(1), entry(16))
    assert cache.nbytes == 3000 and len(cache) == 3
    assert not cache.contains(long.end) and cache.contains(long.boundary(1)) and cache.contains(long.boundary(2))
    assert PromptCache(0, 16).lookup(long) is None


class Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.end = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            assert event.text == ""  # the scheduler sends ids; the HTTP side decodes them
            self.tokens += event.tokens
        else:
            self.end = event
            self.done.set()


def make_scheduler(model, tokenizer, slots=4, queue=16, budget=40, cache_bytes=1 << 24, prefill_batch=1, start=True):
    s = Scheduler(
        PoolEngine(model, slots),
        tokenizer,
        max_queue=queue,
        max_num_batched_tokens=budget,
        prompt_cache=PromptCache(cache_bytes, INTERVAL),
        metrics=ServerMetrics("t"),
        eos_token_id=None,
        max_prefill_batch=prefill_batch,
    )
    if start:
        s.start()
    return s


def wait_all(sinks, seconds=60):
    deadline = time.monotonic() + seconds
    for sink in sinks:
        assert sink.done.wait(max(0.0, deadline - time.monotonic())), "request did not finish in time"


def test_scheduler_matches_offline_for_greedy_and_seeded_requests(model, tokenizer):
    # Every prompt prefilled alone: bit for bit the path of single-prompt generate.
    s = make_scheduler(model, tokenizer, slots=3)  # fewer slots than requests: some wait, then join
    try:
        cases = []
        for i, p in enumerate(prompts(7, seed=3)):
            options = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.9, top_k=40, top_p=0.95, seed=i)
            if i == 3:
                options["repetition_penalty"] = 1.3
            sink = Collect()
            s.submit(p, SamplingParams(max_tokens=5 + 2 * i, **options), sink, timeout=60)
            cases.append((p, 5 + 2 * i, options, sink))
        wait_all([c[3] for c in cases])
        for p, n, options, sink in cases:
            assert isinstance(sink.end, Finished) and sink.end.reason == "length"
            assert sink.tokens == generate(model, [p], n, prefill_chunk_size=INTERVAL, **options)[0]
        assert s.num_running == 0 and s.num_waiting == 0 and s.engine.free_slots == 3
    finally:
        s.shutdown()


def test_scheduler_timeout_queue_full_and_abort(model, tokenizer):
    s = make_scheduler(model, tokenizer, slots=1, queue=1)
    try:
        slow = Collect()
        rid = s.submit([1, 2, 3], SamplingParams(max_tokens=10**6, temperature=0.0), slow, timeout=60)
        deadline = time.monotonic() + 30
        while s.num_running == 0 and time.monotonic() < deadline:  # wait until it holds the slot
            time.sleep(0.01)
        waiting = Collect()
        s.submit([4, 5], SamplingParams(max_tokens=3, temperature=0.0), waiting, timeout=0.3)
        with pytest.raises(QueueFull):
            s.submit([6], SamplingParams(max_tokens=1), Collect(), timeout=60)
        wait_all([waiting], 30)
        assert isinstance(waiting.end, Failed) and waiting.end.status == 504  # timed out while queued
        s.abort(rid)
        wait_all([slow], 30)
        assert isinstance(slow.end, Finished) and slow.end.reason == "abort" and len(slow.tokens) > 0
        after = Collect()
        s.submit([4, 5], SamplingParams(max_tokens=3, temperature=0.0), after, timeout=60)
        wait_all([after], 30)
        assert after.tokens == generate(model, [[4, 5]], 3)[0] and s.engine.free_slots == 1
    finally:
        s.shutdown()


def prefill_forwards(s: Scheduler) -> int:
    return int(s.metrics.registry.get_sample_value("blackmamba:prefill_chunk_seconds_count", {"model_name": "t"}))


def test_batched_prefill_equals_offline_generation_of_the_same_batch(model, tokenizer):
    # Prompts of one chunk each (<= INTERVAL tokens) within 2x of each other's length: queued before the loop
    # starts, they are admitted together and prefilled in one left-padded forward, then decoded as one batch,
    # which is what offline generate does with the same prompts as one batch.
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(0, 300, (k,), generator=g).tolist() for k in (16, 9, 13, 11, 16)]
    s = make_scheduler(model, tokenizer, slots=5, budget=200, prefill_batch=8, start=False)
    try:
        sinks = [Collect() for _ in ps]
        for p, sink in zip(ps, sinks, strict=True):
            s.submit(p, SamplingParams(max_tokens=8, temperature=0.0), sink, timeout=60)
        s.start()
        wait_all(sinks)
        assert prefill_forwards(s) == 1
        assert [sink.tokens for sink in sinks] == generate(model, ps, 8)
        assert len({tuple(sink.tokens) for sink in sinks}) == len(ps)
    finally:
        s.shutdown()


def test_prefill_groups_keep_chunk_order_and_bound_padding(model, tokenizer):
    s = make_scheduler(model, tokenizer, slots=8, budget=1000, prefill_batch=3, start=False)
    long, fresh = prompts(1, seed=6, low=40, high=41)[0], prompts(6, seed=7, low=2, high=17)
    for p in [long, *fresh]:
        s.submit(p, SamplingParams(max_tokens=1), Collect(), timeout=60)
    s._take_inbox()
    with torch.inference_mode():
        s._admit(time.monotonic())
    groups = s._prefill_groups(s._plan_prefill(1000))
    s.shutdown()
    by_request: dict[int, list[tuple[int, int]]] = {}
    for group in groups:
        assert len(group) <= 3
        lengths = [end - start for _, start, end in group]
        if any(start > 0 for _, start, _ in group):  # a continuing state is never padded
            assert len(set(lengths)) == 1
        assert max(lengths) <= 2 * min(lengths)
        assert len({r.rid for r, _, _ in group}) == len(group)
        for r, start, end in group:
            by_request.setdefault(r.rid, []).append((start, end))
    # Each request's chunks run in order, end on the grid, and cover its prompt once.
    for rid, spans in by_request.items():
        length = len(long) if rid == 1 else len(fresh[rid - 2])
        assert [e for _, e in spans] == sorted({*range(INTERVAL, length, INTERVAL), length})
        assert [a for a, _ in spans] == [0, *[e for _, e in spans][:-1]]
