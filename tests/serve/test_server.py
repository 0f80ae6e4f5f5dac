"""The HTTP server end to end on a loopback port: the official OpenAI client, raw HTTP for every error,
continuous batching against offline generation, aborts, 429, the prompt cache, metrics, API keys."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from blackmamba import generate
from blackmamba.serve.chat import render_plain

from .conftest import INTERVAL, start_server

KEY = "test-key-123"
PROMPT = "the old river runs past a quiet town"


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir, api_key=KEY, max_model_len=512, max_body_bytes=64 * 1024)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def offline(model, ids, n, **options):
    return generate(model, [ids], n, prefill_chunk_size=INTERVAL, **options)[0]


def metrics(http) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r',?model_name="[^"]*"', "", name).replace("{}", "")] = float(value)
    return out


def test_completion_matches_offline_greedy_stream_and_usage(client, model, tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    want = tokenizer.decode(offline(model, ids, 12, eos_token_id=0))
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and len(set(want)) > 3
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    stream = client.completions.create(
        model="tiny", prompt=ids, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_seeded_sampling_and_stop_strings_match_offline(client, model, tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    options = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    tokens = offline(model, ids, 20, repetition_penalty=1.2, **options)
    text = tokenizer.decode(tokens)
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=20, extra_body={"repetition_penalty": 1.2, "top_k": 50},
        temperature=0.9, top_p=0.9, seed=1234,
    )  # fmt: skip
    assert r.choices[0].text == text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=20, stop=[stop], extra_body={"repetition_penalty": 1.2, "top_k": 50},
        temperature=0.9, top_p=0.9, seed=1234,
    )  # fmt: skip
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_plain_template_and_stops_at_the_next_turn(client, http, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the old river"}]
    rendered = render_plain(messages)
    assert rendered == "Be brief.\n\nUser: the old river\n\nAssistant:"
    ids = tokenizer.encode(rendered).ids
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == ids
    want = tokenizer.decode(offline(model, ids, 10, eos_token_id=0)).split("\nUser:")[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    parts = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == want


def test_logprobs_and_echo_are_the_model_distribution(client, model, tokenizer):
    ids = tokenizer.encode(PROMPT).ids
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(tokenizer.decode(ids)) and len(lp.tokens) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float()[:, : tokenizer.get_vocab_size()], -1)
    want = [full[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    greedy = lp.token_logprobs[len(ids)]
    assert greedy == pytest.approx(full[-1].max().item(), abs=1e-4)
    assert all(len(t) == 3 for t in lp.top_logprobs[1:]) and max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_tokenize_detokenize_models_health_version_page(http, server, tokenizer):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert ids["tokens"] == tokenizer.encode(PROMPT).ids and ids["count"] == len(ids["tokens"])
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == PROMPT
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/version").json()["version"]
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="generate"', 'id="ttft"', 'id="tps"', "/v1/completions"):
        assert element in page.text


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == status
    return error


BAD_REQUESTS = [
    ("{not json", "malformed JSON"),
    ('{"prompt": "x", "temperature": NaN}', "NaN"),
    ("[1, 2]", "JSON object"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": ""}, "empty"),
    ({"prompt": []}, "empty"),
    ({"prompt": [1, 2, 999999]}, "outside"),
    ({"prompt": [1, -1]}, "outside"),
    ({"prompt": ["a", "b"]}, "one prompt"),
    ({"prompt": [7] * 600}, "512"),
    ({"prompt": "x", "max_tokens": 600}, "maximum context length"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "presence_penalty": 0.5}, "not supported"),
    ({"prompt": "x", "model": 3}, "model"),
]


@pytest.mark.parametrize("body, fragment", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_completion_requests_get_400_with_an_error_object(http, body, fragment):
    if isinstance(body, str):
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/completions", json={"model": "tiny", **body} if "model" not in body else body)
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error" and fragment in error["message"], error


def test_other_errors_have_their_status_and_the_server_keeps_serving(http, client):
    assert error_of(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)["param"] == "model"
    error_of(http.post("/v1/chat/completions", json={"messages": []}), 400)
    error_of(http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    error_of(http.post("/detokenize", json={"tokens": [10**6]}), 400)
    error_of(http.post("/tokenize", json={"prompt": "x", "messages": []}), 400)
    error_of(http.post("/v1/completions", content=b"{" + b" " * 70_000 + b"}"), 413)
    error_of(http.get("/v1/nothing-here"), 404)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_api_key_is_required_on_v1_only(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert error_of(httpx.post(server.url + "/v1/completions", json=body), 401)["type"] == "authentication_error"
    wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert "wrong" in error_of(wrong, 401)["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200


async def _stream_all(url, requests):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(ids, n, options):
        stream = await client.completions.create(model="tiny", prompt=ids, max_tokens=n, stream=True, **options)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(*r) for r in requests)), 300)
    finally:
        await client.close()


def concurrent_case(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(n):
        ids = torch.randint(0, 300, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        options = {"temperature": 0} if i % 3 else {"temperature": 0.8, "seed": 100 + i, "top_p": 0.95}
        cases.append((ids, 4 + (7 * i) % 23, options))
    return cases


def check_concurrent(server, model, tokenizer, n):
    cases = concurrent_case(n)
    texts = asyncio.run(_stream_all(server.url, cases))
    for (ids, count, options), text in zip(cases, texts, strict=True):
        assert text == tokenizer.decode(offline(model, ids, count, eos_token_id=0, **options))


def test_concurrent_streams_equal_offline_generation(server, model, tokenizer):
    check_concurrent(server, model, tokenizer, 10)


@pytest.mark.hostile
def test_32_concurrent_streams_equal_offline_generation(server, model, tokenizer):
    check_concurrent(server, model, tokenizer, 32)


def test_metrics_count_what_was_sent(http, client, tokenizer):
    before = metrics(http)
    sent = [("a b c", 3), ("the old river", 5), ("x " * 40, 2)]
    for prompt, n in sent:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=n, extra_body={"ignore_eos": True})
    after = metrics(http)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("blackmamba:prompt_tokens_total") == sum(len(tokenizer.encode(p).ids) for p, _ in sent)
    assert delta("blackmamba:generation_tokens_total") == sum(n for _, n in sent)
    assert delta('blackmamba:request_success_total{finished_reason="length"}') == 3
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"blackmamba:{name}_count") == 3
    assert delta("blackmamba:inter_token_latency_seconds_count") == sum(n - 1 for _, n in sent)
    assert after["blackmamba:num_requests_running"] == 0 and after["blackmamba:num_requests_waiting"] == 0


def test_prompt_cache_is_exact_and_its_counters_move(http, client, model_dir, model, tokenizer):
    g = torch.Generator().manual_seed(9)
    shared = torch.randint(0, 300, (3 * INTERVAL + 5,), generator=g).tolist()
    a, b = shared + [11, 12, 13], shared + [21, 22]

    def ask(c, ids):
        r = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=5)
        return r.choices[0].text, r.choices[0].logprobs.top_logprobs, r.usage.prompt_tokens_details.cached_tokens

    before = metrics(http)
    first, second, again = ask(client, a), ask(client, b), ask(client, b)
    after = metrics(http)
    assert (first[2], second[2], again[2]) == (0, 3 * INTERVAL, len(b))
    assert after["blackmamba:prefix_cache_queries_total"] - before["blackmamba:prefix_cache_queries_total"] == (
        len(a) + 2 * len(b)
    )
    assert after["blackmamba:prefix_cache_hits_total"] - before["blackmamba:prefix_cache_hits_total"] == (
        3 * INTERVAL + len(b)
    )
    uncached = start_server(model_dir, prompt_cache_mib=0)
    try:
        plain = openai.OpenAI(base_url=uncached.url + "/v1", api_key="-", max_retries=0, timeout=60)
        reference = ask(plain, b)
    finally:
        uncached.stop()
    # Bit for bit: the same text and the same log-probabilities, to the last digit JSON carries.
    assert second[:2] == reference[:2] == again[:2] and reference[2] == 0


def _read_stream(url, body, lines, stop):
    """Read a stream's events into ``lines`` until ``stop`` is set, then close the connection mid-stream."""
    with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
            if stop.is_set():
                return


def wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def one_slot(model_dir):
    srv = start_server(model_dir, max_batch=1, max_queue=1, max_model_len=100_000)
    yield srv
    srv.stop()


def test_aborted_stream_frees_its_slot_and_a_full_queue_gets_429(one_slot, model, tokenizer):
    url = one_slot.url + "/v1/completions"
    http = httpx.Client(base_url=one_slot.url, timeout=60)
    long = {"model": "tiny", "prompt": "the old", "max_tokens": 90_000, "stream": True, "ignore_eos": True}
    lines: list[str] = []
    stop = threading.Event()
    reader = threading.Thread(target=_read_stream, args=(url, long, lines, stop), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: len(lines) >= 2), "the long stream never started"
        body = {"model": "tiny", "prompt": "the old river", "max_tokens": 4, "temperature": 0}
        queued: list[httpx.Response] = []
        waiter = threading.Thread(target=lambda: queued.append(httpx.post(url, json=body, timeout=60)), daemon=True)
        waiter.start()
        assert wait_for(lambda: metrics(http).get("blackmamba:num_requests_waiting") == 1)
        assert "full" in error_of(http.post("/v1/completions", json=body), 429)["message"]
        before = metrics(http).get('blackmamba:request_success_total{finished_reason="abort"}', 0)
    finally:
        stop.set()  # the client goes away: its slot must pass to the queued request
    reader.join(30)
    waiter.join(60)
    assert not reader.is_alive() and not waiter.is_alive()
    assert queued[0].status_code == 200, queued[0].text
    ids = tokenizer.encode("the old river").ids
    assert queued[0].json()["choices"][0]["text"] == tokenizer.decode(offline(model, ids, 4, eos_token_id=0))
    after = metrics(http)
    assert after['blackmamba:request_success_total{finished_reason="abort"}'] == before + 1
    assert after["blackmamba:num_requests_running"] == 0
    http.close()
