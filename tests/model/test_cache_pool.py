"""The inference state as a pool of slots: sequences join and leave between decode steps, each decoding
exactly as if it ran alone; slots are written from a prefill, reset, released, snapshot and restored."""

import pytest
import torch

from blackmamba.generation import Decoder, SamplingOptions

from ..helpers import assert_close, tiny_model

PROMPTS = [[5, 9, 200, 17, 3], [8, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9], [77, 78, 79]]


def greedy_alone(model, prompt, steps):
    """Greedy tokens of one sequence decoded in a cache of its own."""
    cache = model.allocate_cache(1)
    logits = model(torch.tensor([prompt]), cache=cache).logits[:, -1]
    tokens = []
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(token.item())
        logits = model.step(token, cache)
    return tokens


@torch.no_grad()
def test_slots_joining_and_leaving_decode_as_if_alone():
    model = tiny_model()
    steps = 6
    alone = [greedy_alone(model, p, steps) for p in PROMPTS]
    pool = model.allocate_cache(5)
    got = {i: [] for i in range(len(PROMPTS))}
    live = {}  # sequence -> (slot, logits of its last position)
    # Sequence i joins before step i (prefilled in its own cache, then written into a free slot) and leaves
    # after its last token; the active slots are never a contiguous range.
    pool.acquire()  # slot 0 stays taken and unused
    for t in range(steps + len(PROMPTS)):
        if t < len(PROMPTS):
            own = model.allocate_cache(1)
            logits = model(torch.tensor([PROMPTS[t]]), cache=own).logits[:, -1]
            slot = pool.acquire()
            pool.write(slot, own)
            live[t] = (slot, logits[0])
        if not live:
            break
        order = sorted(live, key=lambda i: -live[i][0])  # rows in descending slot order
        tokens = torch.stack([live[i][1].argmax() for i in order])
        for i, token in zip(order, tokens.tolist(), strict=True):
            got[i].append(token)
        slots = torch.tensor([live[i][0] for i in order])
        logits = model.step(tokens, pool, slots)
        for row, i in enumerate(order):
            live[i] = (live[i][0], logits[row])
            if len(got[i]) == steps:
                pool.release(live.pop(i)[0])
    assert [got[i] for i in range(len(PROMPTS))] == alone


@torch.no_grad()
def test_step_on_some_slots_leaves_the_others_untouched():
    model = tiny_model()
    pool = model.allocate_cache(4)
    model(torch.tensor([PROMPTS[2][:4]] * 4), cache=pool)
    before = [t.clone() for t in pool.tensors()]
    model.step(torch.tensor([3, 4]), pool, torch.tensor([2, 0]))
    for old, new in zip(before, pool.tensors(), strict=True):
        assert torch.equal(old[[1, 3]], new[[1, 3]])
        assert not torch.equal(old[[0, 2]], new[[0, 2]])


@torch.no_grad()
def test_prefill_into_slots_equals_prefill_alone():
    model = tiny_model()
    pool = model.allocate_cache(4)
    ids = torch.tensor([PROMPTS[0], PROMPTS[3][:2] + [9, 9, 9]])
    together = model(ids, cache=pool, slots=torch.tensor([3, 1])).logits
    for row, slot in ((0, 3), (1, 1)):
        own = model.allocate_cache(1)
        alone = model(ids[row : row + 1], cache=own).logits
        assert_close(f"logits of row {row}", alone, together[row : row + 1], torch.float32)
        for i, (a, b) in enumerate(zip(pool.snapshot(slot).tensors(), own.tensors(), strict=True)):
            assert_close(f"state tensor {i} of slot {slot}", b, a, torch.float32)
    assert all(t[[0, 2]].abs().sum() == 0 for t in pool.tensors())  # slots not named stay zero


@torch.no_grad()
def test_snapshot_restore_round_trip_is_bit_exact():
    model = tiny_model()
    pool = model.allocate_cache(3)
    model(torch.tensor([PROMPTS[2][:5], PROMPTS[0]]), cache=pool, slots=torch.tensor([0, 2]))
    snap = pool.snapshot(2)
    assert snap.n_slots == 1
    first = model.step(torch.tensor([7]), pool, torch.tensor([2]))
    after_first = [t[2].clone() for t in pool.tensors()]
    model.step(torch.tensor([8]), pool, torch.tensor([2]))  # the slot moves on
    pool.restore(2, snap)
    assert torch.equal(model.step(torch.tensor([7]), pool, torch.tensor([2])), first)
    assert all(torch.equal(t[2], a) for t, a in zip(pool.tensors(), after_first, strict=True))
    pool.restore(1, snap)  # into another slot: the same sequence continues there
    assert torch.equal(model.step(torch.tensor([7]), pool, torch.tensor([1])), first)


def test_acquire_release_and_reset():
    model = tiny_model()
    pool = model.allocate_cache(2)
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6], [7, 8, 9]]), cache=pool)
    assert [pool.acquire(), pool.acquire()] == [0, 1]
    with pytest.raises(RuntimeError, match="taken"):
        pool.acquire()
    pool.release(0)
    assert all(t[0].abs().sum() == 0 and t[1].abs().sum() > 0 for t in pool.tensors())
    with pytest.raises(ValueError, match="slot 0"):
        pool.release(0)
    assert pool.acquire() == 0
    pool.reset()
    assert all(t.abs().sum() == 0 for t in pool.tensors())


def test_decoder_over_a_given_pool_uses_its_slots_and_pad():
    """The decoder steps the rows' slots of the pool it is given; rows past the batch use the last slot."""
    model = tiny_model()
    pool = model.allocate_cache(6)
    decoder = Decoder(model, SamplingOptions(), use_graphs=False, buckets=True, pool=pool)
    with torch.no_grad():
        own = model.allocate_cache(3)
        logits = model(torch.tensor([PROMPTS[0][:2], PROMPTS[1], PROMPTS[3][:2]]), cache=own).logits[:, -1]
    first = logits.argmax(-1)
    bucket = decoder.start(own, first, None, slots=torch.tensor([4, 0, 2]))
    assert bucket.size == 4 and bucket.slots.tolist() == [4, 0, 2, 5]
    untouched = [t[[1, 3]].clone() for t in pool.tensors()]
    tokens = [decoder.step(bucket, None)[:3].tolist() for _ in range(4)]
    assert all(torch.equal(t[[1, 3]], u) for t, u in zip(pool.tensors(), untouched, strict=True))
    alone = [greedy_alone(model, p, 5)[1:] for p in (PROMPTS[0][:2], PROMPTS[1], PROMPTS[3][:2])]
    assert [list(col) for col in zip(*tokens, strict=True)] == alone
    with pytest.raises(ValueError, match="pool of 9 slots"):
        decoder.start(own, torch.zeros(8, dtype=torch.long), None)
