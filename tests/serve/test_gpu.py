"""The server on a GPU: the decode step replays CUDA graphs per batch bucket, and its streams still equal
offline generation (which runs its own graphs) whatever shares the batch; prompts prefilled together equal
offline generation of the same batch."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from blackmamba import generate, load_pretrained
from blackmamba.serve.scheduler import SamplingParams

from .conftest import INTERVAL, start_server
from .test_engine import Collect, make_scheduler, prefill_forwards, wait_all

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_concurrent_streams_on_the_gpu_equal_offline_generation(model_dir, dtype):
    model = load_pretrained(model_dir, device="cuda", dtype=getattr(torch, dtype))
    # Every prompt prefilled alone: the path of single-prompt generate (batched prefill rounds as a batch does).
    srv = start_server(model_dir, device="cuda", dtype=dtype, max_batch=6, max_prefill_batch=1)
    assert srv.state.scheduler.engine.cuda_graphs
    g = torch.Generator().manual_seed(0)
    cases = []
    for i in range(13):  # more requests than slots: batches of every bucket size come and go
        ids = torch.randint(0, 300, (int(torch.randint(1, 50, (1,), generator=g)),), generator=g).tolist()
        options = {"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i, "top_p": 0.9}
        cases.append((ids, 3 + (5 * i) % 17, options))

    try:
        texts = asyncio.run(run_texts(srv.url, cases))
    finally:
        srv.stop()
    tokenizer = srv.state.tokenizer
    for (ids, n, options), text in zip(cases, texts, strict=True):
        want = generate(model, [ids], n, eos_token_id=0, prefill_chunk_size=INTERVAL, **options)[0]
        assert text == tokenizer.decode(want)


async def run_texts(url, cases):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)

    async def one(ids, n, options):
        stream = await client.completions.create(model="tiny", prompt=ids, max_tokens=n, stream=True, **options)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(*c) for c in cases)), 300)
    finally:
        await client.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_prefill_on_the_gpu_equals_offline_generation_of_the_same_batch(model_dir, tokenizer, dtype):
    model = load_pretrained(model_dir, device="cuda", dtype=getattr(torch, dtype))
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(0, 300, (k,), generator=g).tolist() for k in (16, 9, 13, 11, 16)]
    # 8 slots: the decode step runs in the bucket of 8, as offline generate's five rows do.
    s = make_scheduler(model, tokenizer, slots=8, budget=200, prefill_batch=8, start=False)
    assert s.engine.cuda_graphs
    try:
        sinks = [Collect() for _ in ps]
        for p, sink in zip(ps, sinks, strict=True):
            s.submit(p, SamplingParams(max_tokens=8, temperature=0.0), sink, timeout=60)
        s.start()
        wait_all(sinks)
        assert prefill_forwards(s) == 1
        assert [sink.tokens for sink in sinks] == generate(model, ps, 8)
    finally:
        s.shutdown()
