"""Bucketed prefill (blackmamba.generation.prefill_graphs): the buckets, the chunk plan, and its eager twin
against the plain prefill; on a GPU, the captured replay against the eager twin."""

import pytest
import torch

from blackmamba.generation import GenerationError, generate, prefill
from blackmamba.generation.generate import _left_pad_host
from blackmamba.generation.prefill_graphs import PrefillBuckets, PrefillGraphs, plan
from blackmamba.model import cast_model

from ..helpers import DEVICE, assert_caches_close, assert_close, tiny_model

# Small buckets so that the tiny model crosses every boundary quickly: 2, 4, then multiples of 4 up to 8.
SMALL = PrefillBuckets(min_length=2, step=4, max_length=8)
TOL = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}


def random_prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def model_in(dtype, device="cpu"):
    return cast_model(tiny_model(), dtype).to(device)


def plain_and_bucketed(model, prompts, runner, chunk_size=None):
    """(logits, cache) of the plain prefill and of ``runner`` for the same prompts, from zero states."""
    ids, mask = _left_pad_host(prompts)
    device = model.device
    plain_cache, cache = model.allocate_cache(len(prompts)), model.allocate_cache(len(prompts))
    plain = prefill(model, ids.to(device), plain_cache, None if mask is None else mask.to(device), chunk_size)
    out = runner.run(ids, cache, mask, chunk_size=chunk_size)
    return (plain, plain_cache), (out, cache)


def test_buckets_cover_every_length_with_bounded_padding():
    buckets = PrefillBuckets()
    assert list(buckets.sizes) == sorted(set(buckets.sizes)) and buckets.sizes[-1] == buckets.max_length
    for n in range(1, buckets.max_length + 1):
        b = buckets.bucket(n)
        assert b >= n and not any(n <= s < b for s in buckets.sizes)
        assert b - n < (buckets.step if n > buckets.step else n) or b == buckets.min_length


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_length=0), dict(step=3, max_length=8), dict(min_length=8, step=4, max_length=8), dict(step=True)],
)
def test_bad_buckets_are_refused(kwargs):
    with pytest.raises(GenerationError):
        PrefillBuckets(**kwargs)


def test_bucket_refuses_lengths_outside_the_range():
    with pytest.raises(GenerationError, match="outside"):
        SMALL.bucket(SMALL.max_length + 1)


@pytest.mark.parametrize("lengths", [[1], [5], [8], [9], [21], [21, 3, 16], [16, 8]])
def test_plan_pads_only_the_first_chunk_and_fills_the_rest(lengths):
    chunks = plan(lengths, SMALL)
    assert sum(c.size for c in chunks) == max(lengths)
    assert [c.start for c in chunks] == [sum(c.size for c in chunks[:i]) for i in range(len(chunks))]
    assert all(c.graphed for c in chunks) and chunks[0].width == SMALL.bucket(chunks[0].size)
    assert all(c.width == c.size == SMALL.max_length for c in chunks[1:])
    padding = max(lengths) - min(lengths)  # columns of the left padding of the shortest row
    assert all(c.masked == (c.start < padding) for c in chunks[1:])
    assert chunks[0].masked == (chunks[0].width > chunks[0].size or min(lengths) < max(lengths))


def test_plan_of_a_continuation_never_pads():
    # Continuing from a state, a chunk whose length is not a bucket runs eagerly at its own length.
    assert [(c.width, c.graphed) for c in plan([7], SMALL, fresh=False)] == [(7, False)]
    assert [(c.width, c.graphed) for c in plan([12], SMALL, fresh=False)] == [(4, True), (8, True)]
    # An explicit chunk size: the first chunk pads, later ones run graphed only at a bucket length.
    chunks = plan([11], SMALL, chunk_size=3)
    assert [(c.size, c.width, c.graphed) for c in chunks] == [(3, 4, True), (3, 3, False), (3, 3, False), (2, 2, True)]
    assert [c.graphed for c in plan([20], SMALL, chunk_size=10)] == [False, False]  # longer than max_length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths",
    [[1], [3], [3, 4, 5], [7], [8], [9], [19], [5, 1, 8, 3], [17, 2, 9, 1, 12]],
    ids=lambda x: "-".join(map(str, x)),
)
def test_bucketed_prefill_equals_plain_prefill(lengths, dtype):
    """Awkward lengths (1, bucket - 1, bucket, bucket + 1, longer than the longest chunk) and mixed batches
    (3 or 5 rows in a bucket of 4 or 8): same last logits and same states as the plain prefill."""
    model = model_in(dtype)
    runner = PrefillGraphs(model, buckets=SMALL)
    (plain, plain_cache), (out, cache) = plain_and_bucketed(model, random_prompts(lengths), runner)
    assert_close("logits", plain, out, TOL[dtype])
    assert_caches_close(plain_cache, cache, TOL[dtype])
    assert runner.num_graphs == 0 and runner._entries  # the eager twin ran on its buffers


def test_bucketed_prefill_with_a_chunk_size_equals_plain_prefill():
    model = model_in(torch.float32)
    runner = PrefillGraphs(model, buckets=SMALL)
    (plain, plain_cache), (out, cache) = plain_and_bucketed(model, random_prompts([13, 6]), runner, chunk_size=3)
    assert_close("logits", plain, out, torch.float32)
    assert_caches_close(plain_cache, cache)


@pytest.mark.parametrize("length", [4, 6, 11])
def test_continuation_into_pool_slots_equals_plain_prefill(length):
    """A prompt's second part continues from the state its first part left in slots of a pool."""
    model = model_in(torch.float32)
    runner = PrefillGraphs(model, buckets=SMALL)
    first, second = random_prompts([5, 5]), random_prompts([length, length], seed=1)
    slots = torch.tensor([3, 1])
    pools = []
    for use_runner in (False, True):
        pool = model.allocate_cache(4)
        other = pool.layers[0].ssm_state[0]  # slot 0 is another stream's: it must stay as it is
        other.copy_(torch.randn(other.shape, generator=torch.Generator().manual_seed(2)))
        model(torch.tensor(first), cache=pool, slots=slots)
        ids = torch.tensor(second)
        if use_runner:
            logits = runner.run(ids, pool, slots=slots, fresh=False)
        else:
            logits = model(ids, cache=pool, slots=slots, num_last_tokens=1).logits[:, -1]
        pools.append((logits, pool))
    assert_close("logits", pools[0][0], pools[1][0], torch.float32)
    assert_caches_close(pools[0][1], pools[1][1])


def test_at_most_max_graphs_shapes_are_kept():
    model = model_in(torch.float32)
    runner = PrefillGraphs(model, buckets=SMALL, max_graphs=2)
    for lengths in ([1], [3], [6], [2, 1]):
        (plain, _), (out, _) = plain_and_bucketed(model, random_prompts(lengths), runner)
        assert_close("logits", plain, out, torch.float32)
        assert len(runner._entries) <= 2
    runner.clear()
    assert not runner._entries


@pytest.mark.parametrize(
    "model, runner_kwargs",
    [
        (lambda: tiny_model(vocab_size=64, layer_pattern=["attention", "moe"], n_heads=2, max_seq_len=16), {}),
        (lambda: tiny_model(), dict(max_tokens=7)),  # a bucket of 8 tokens is over the cap
    ],
    ids=["attention", "max_tokens"],
)
def test_unsupported_prefills_run_the_plain_prefill(model, runner_kwargs):
    model = model()
    runner = PrefillGraphs(model, buckets=SMALL, **runner_kwargs)
    (plain, plain_cache), (out, cache) = plain_and_bucketed(model, random_prompts([5, 2], vocab=64), runner)
    assert_close("logits", plain, out, "exact")
    for i, (a, b) in enumerate(zip(plain_cache.tensors(), cache.tensors(), strict=True)):
        assert torch.equal(a, b), f"cache tensor {i}"
    assert not runner._entries


def engine_prefills(engine, prompts):
    """Fresh padded chunks, then a continuation at a bucket length, then one at another length."""
    with torch.inference_mode():  # as the scheduler's thread runs the engine
        return _engine_prefills(engine, prompts)


def _engine_prefills(engine, prompts):
    slots = [engine.acquire() for _ in prompts]
    first = engine.prefill_batch(slots, prompts)
    second = engine.prefill_batch(slots, random_prompts([4] * len(prompts), seed=1))
    third = engine.prefill(slots[1], [1, 2, 3])
    return [first, second, third], slots


def check_engine_equals_plain(engine, plain, prompts, dtype):
    (outs, slots), (refs, ref_slots) = engine_prefills(engine, prompts), engine_prefills(plain, prompts)
    assert slots == ref_slots
    for name, ref, out in zip(("fresh", "continued", "odd length"), refs, outs, strict=True):
        assert_close(name, ref, out, dtype)
    assert_caches_close(plain.pool, engine.pool, dtype)


def test_pool_engine_prefills_through_the_bucketed_path():
    """The server's engine with the eager twin in place of the graphs equals its plain prefill."""
    from blackmamba.serve.engine import PoolEngine

    model = model_in(torch.float32)
    engine, plain = PoolEngine(model, 4), PoolEngine(model, 4)
    engine._prefill = PrefillGraphs(model, buckets=SMALL)
    check_engine_equals_plain(engine, plain, random_prompts([7, 2, 5]), torch.float32)
    assert len(engine._prefill._entries) == 2  # (4 rows, 8 masked) and (4 rows, 4): the 3-token chunk ran eagerly


def test_prefill_graphs_need_a_gpu():
    model = tiny_model()
    with pytest.raises(ValueError, match="CUDA"):
        PrefillGraphs(model, use_graphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, [[1, 2, 3]], 2, prefill_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_replay_equals_the_eager_twin(dtype):
    """On CUDA the replayed graphs compute exactly what the same buckets compute eagerly, and stay within
    rounding of the plain prefill; 16 x 64 tokens in bf16 take torch._grouped_mm inside the capture."""
    model = model_in(dtype, DEVICE)
    buckets = PrefillBuckets(min_length=2, step=16, max_length=64)
    graphs, eager = PrefillGraphs(model, True, buckets), PrefillGraphs(model, False, buckets)
    for lengths in ([1], [3], [15], [16], [17], [64], [150], [5, 1, 33, 3], [100, 7, 64], [64] * 16):
        prompts = random_prompts(lengths, seed=len(lengths))
        (plain, plain_cache), (replayed, replayed_cache) = plain_and_bucketed(model, prompts, graphs)
        (_, _), (twin, twin_cache) = plain_and_bucketed(model, prompts, eager)
        assert_close(f"{lengths} replay vs plain", plain, replayed, TOL[dtype])
        assert_caches_close(plain_cache, replayed_cache, TOL[dtype])
        assert_close(f"{lengths} replay vs eager twin", twin, replayed, "exact")
        assert_caches_close(twin_cache, replayed_cache, "exact")
    assert graphs.num_graphs == len(graphs._entries) > 0


@pytest.mark.gpu
def test_generate_with_prefill_graphs_equals_eager_prefill():
    model = tiny_model().cuda()
    prompts = random_prompts([40, 3, 17])
    eager = generate(model, prompts, 12, prefill_graphs=False)
    assert generate(model, prompts, 12, prefill_graphs=True) == eager
    assert generate(model, prompts, 12, prefill_graphs=True, prefill_chunk_size=16) == eager


@pytest.mark.gpu
def test_pool_engine_replays_prefill_graphs():
    from blackmamba.serve.engine import PoolEngine

    model = tiny_model().cuda()
    engine, plain = PoolEngine(model, 4), PoolEngine(model, 4, cuda_graphs=False)
    engine._prefill.buckets = SMALL
    check_engine_equals_plain(engine, plain, random_prompts([7, 2, 5]), torch.float32)
    assert engine._prefill.num_graphs == 2
