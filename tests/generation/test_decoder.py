"""The decode loop on static buffers: chunked prefill, bucketed batches, CUDA graphs (on the GPU)."""

import importlib

import pytest
import torch

from blackmamba.generation import Decoder, SamplingOptions, generate, prefill, stream_generate
from blackmamba.generation.generate import _left_pad

from ..helpers import assert_caches_close, assert_close, tiny_model

PROMPTS = [[5, 9, 200, 17, 3, 99, 4], [8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [77, 78]]


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_prefill_equals_one_forward(chunk):
    model = tiny_model()
    ids, mask = _left_pad(PROMPTS, model.device)
    whole_cache, part_cache = model.allocate_cache(len(PROMPTS)), model.allocate_cache(len(PROMPTS))
    whole = prefill(model, ids, whole_cache, mask)
    parts = prefill(model, ids, part_cache, mask, chunk_size=chunk)
    assert_close("logits", whole, parts, torch.float32)
    assert_caches_close(part_cache, whole_cache)


def test_prefill_rejects_a_bad_chunk_size():
    model = tiny_model()
    with pytest.raises(ValueError, match="chunk size"):
        prefill(model, torch.tensor([[1, 2]]), model.allocate_cache(1), chunk_size=0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bucketed_batch_gives_the_same_tokens(temperature, monkeypatch):
    """Rows of a bucket beyond the batch (3 prompts in a bucket of 4) change nothing for the real rows."""
    model = tiny_model()
    kwargs = dict(max_new_tokens=12, temperature=temperature, top_k=20, seed=7)
    exact = generate(model, PROMPTS[:3], **kwargs)
    bucketed = Decoder(model, SamplingOptions(temperature, 20), use_graphs=False, buckets=True)
    monkeypatch.setattr(importlib.import_module("blackmamba.generation.generate"), "decoder_for", lambda *a: bucketed)
    assert generate(model, PROMPTS[:3], **kwargs) == exact
    assert set(bucketed._buckets) == {4}


def test_sampling_is_reproducible_and_penalty_applies():
    model = tiny_model()
    a = generate(model, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, PROMPTS, 10, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and a != c
    # A strong repetition penalty never repeats a token that is already there (vocabulary 256 is ample).
    out = generate(model, [[1, 2, 3]], 30, repetition_penalty=1e6)[0]
    assert len(set(out)) == len(out) and not {1, 2, 3} & set(out)


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(ValueError, match="CUDA"):
        Decoder(tiny_model(), SamplingOptions(), use_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graphs_give_the_same_tokens_as_eager(temperature):
    model = tiny_model().cuda()
    kwargs = dict(max_new_tokens=40, temperature=temperature, top_k=50, seed=11)
    eager = generate(model, PROMPTS, cuda_graphs=False, **kwargs)
    graphed = generate(model, PROMPTS, cuda_graphs=True, **kwargs)
    assert graphed == eager


@pytest.mark.gpu
def test_graph_batch_equals_one_by_one():
    model = tiny_model().cuda()
    together = generate(model, PROMPTS, 30, cuda_graphs=True)
    alone = [generate(model, [p], 30, cuda_graphs=True)[0] for p in PROMPTS]
    assert together == alone


@pytest.mark.gpu
def test_decode_memory_does_not_grow():
    model = tiny_model().cuda()
    generate(model, PROMPTS, 8, cuda_graphs=True)  # capture first
    peaks = []
    for n in (256, 2048):
        torch.cuda.reset_peak_memory_stats()
        generate(model, PROMPTS, n, cuda_graphs=True)
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.01


def test_decoder_is_rebuilt_when_the_weights_move():
    """Casting the model gives its parameters new storage: a kept decoder (and its graphs) must not be
    reused then; an unchanged model reuses its decoder."""
    from blackmamba.generation import decoder_for
    from blackmamba.model import cast_model

    model = tiny_model()
    options = SamplingOptions()
    first = decoder_for(model, options)
    assert decoder_for(model, options) is first
    cast_model(model, torch.bfloat16)
    assert decoder_for(model, options) is not first
    out = generate(model, PROMPTS, 5)  # decodes in bf16 with fresh buffers
    assert all(len(o) == 5 for o in out)


def test_training_mode_decodes_eagerly():
    from blackmamba.generation import decoder_for

    model = tiny_model().train()
    assert decoder_for(model, SamplingOptions(), use_graphs=None).use_graphs is False


def _reader_with(pipelined: bool, monkeypatch) -> None:
    module = importlib.import_module("blackmamba.generation.generate")
    monkeypatch.setattr(module, "_queue_ahead", lambda device: pipelined)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 17])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_step_queued_ahead_gives_the_same_tokens(max_new_tokens, temperature, monkeypatch):
    """Queuing the next step before reading the current tokens (what a GPU does) yields the same tokens,
    the same number of steps and the same stop at EOS as reading every step before the next; forced here on
    the CPU, where the copies are synchronous."""
    model = tiny_model()
    kwargs = dict(temperature=temperature, top_k=40, seed=5)
    plain = generate(model, PROMPTS, max_new_tokens, **kwargs)
    eos = plain[0][min(1, len(plain[0]) - 1)]  # a token the first prompt produces early
    plain_eos = list(stream_generate(model, PROMPTS, max_new_tokens, eos_token_id=eos, **kwargs))
    _reader_with(True, monkeypatch)
    assert generate(model, PROMPTS, max_new_tokens, **kwargs) == plain
    assert list(stream_generate(model, PROMPTS, max_new_tokens, eos_token_id=eos, **kwargs)) == plain_eos


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_gpu_pipelined_reads_give_the_same_tokens(temperature, monkeypatch):
    """On the GPU, pinned copies behind events with the next step queued give what one blocking read per
    step gives, graphs and eager, with an EOS that stops some rows early."""
    model = tiny_model().cuda()
    kwargs = dict(max_new_tokens=40, temperature=temperature, top_k=50, seed=11)
    for graphs in (True, False):
        _reader_with(False, monkeypatch)
        plain = generate(model, PROMPTS, cuda_graphs=graphs, **kwargs)
        eos = plain[1][3]
        plain_eos = list(stream_generate(model, PROMPTS, eos_token_id=eos, cuda_graphs=graphs, **kwargs))
        _reader_with(True, monkeypatch)
        assert generate(model, PROMPTS, cuda_graphs=graphs, **kwargs) == plain
        assert list(stream_generate(model, PROMPTS, eos_token_id=eos, cuda_graphs=graphs, **kwargs)) == plain_eos
