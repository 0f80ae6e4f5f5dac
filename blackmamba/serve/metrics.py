"""Prometheus metrics of the server, under the names users already scrape from vLLM (prefix ``blackmamba:``).

| metric | kind | what |
|---|---|---|
| ``blackmamba:num_requests_running`` | gauge | requests holding a state slot (prefilling or decoding) |
| ``blackmamba:num_requests_waiting`` | gauge | requests queued for a slot |
| ``blackmamba:prompt_tokens_total`` | counter | prompt tokens of requests that reached their first token |
| ``blackmamba:generation_tokens_total`` | counter | tokens sampled |
| ``blackmamba:request_success_total{finished_reason}`` | counter | finished requests: stop, length, abort |
| ``blackmamba:prefix_cache_queries_total`` | counter | prompt tokens looked up in the prompt-state cache |
| ``blackmamba:prefix_cache_hits_total`` | counter | prompt tokens served from it |
| ``blackmamba:time_to_first_token_seconds`` | histogram | arrival to first token |
| ``blackmamba:inter_token_latency_seconds`` | histogram | between consecutive tokens of a request |
| ``blackmamba:e2e_request_latency_seconds`` | histogram | arrival to the end |
| ``blackmamba:request_queue_time_seconds`` | histogram | arrival to admission into a slot |
| ``blackmamba:request_prefill_time_seconds`` | histogram | admission to first token |
| ``blackmamba:request_decode_time_seconds`` | histogram | first token to the end |

Two more show where the scheduler's time goes: ``blackmamba:decode_step_seconds`` (one batched decode step
with sampling, in iterations without prefill) and ``blackmamba:prefill_chunk_seconds`` (one prefill forward: a
batch of prompt chunks). Every metric carries a
``model_name`` label. Each server has its own registry, so several can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "blackmamba:"
# Latencies from a millisecond (a GPU decode step) to minutes (a long request on a CPU).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip


class _Live(Collector):
    """Values read at scrape time: the scheduler's queue lengths and the prompt cache's counters."""

    def __init__(self, model_name: str, read: Callable[[], dict[str, float]]) -> None:
        self.model_name = model_name
        self.read = read

    def collect(self) -> Iterator[Metric]:
        values = self.read()
        for name, doc in (
            ("num_requests_running", "Requests holding a state slot (prefilling or decoding)."),
            ("num_requests_waiting", "Requests waiting for a state slot."),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], values.get(name, 0))
            yield gauge
        for name, doc in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prompt-state cache."),
            ("prefix_cache_hits", "Prompt tokens served from the prompt-state cache."),
        ):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], values.get(name, 0))
            yield counter


class _Labelled:
    """A metric with its model_name label already applied."""

    def __init__(self, metric, model_name: str) -> None:
        self._child = metric.labels(model_name=model_name)

    def __getattr__(self, name: str):
        return getattr(self._child, name)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]

        def counter(name: str, doc: str):
            return _Labelled(Counter(PREFIX + name, doc, labels, registry=r), model_name)

        def histogram(name: str, doc: str):
            return _Labelled(Histogram(PREFIX + name, doc, labels, registry=r, buckets=LATENCY_BUCKETS), model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that reached their first token.")
        self.generation_tokens = counter("generation_tokens", "Tokens sampled.")
        self._finished = Counter(
            PREFIX + "request_success", "Finished requests by reason.", ["model_name", "finished_reason"], registry=r
        )
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the end of the request.")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to admission into a state slot.")
        self.prefill_time = histogram("request_prefill_time_seconds", "Admission to first token.")
        self.decode_time = histogram("request_decode_time_seconds", "First token to the end of the request.")
        self.decode_step = histogram(
            "decode_step_seconds", "One batched decode step, sampling included (iterations without prefill)."
        )
        self.prefill_chunk = histogram("prefill_chunk_seconds", "One prefill forward (a batch of prompt chunks).")

    def finished(self, reason: str) -> None:
        self._finished.labels(model_name=self.model_name, finished_reason=reason).inc()

    def watch(self, read: Callable[[], dict[str, float]]) -> None:
        """Register the live values (queue lengths, prompt-cache counters) read at every scrape."""
        self.registry.register(_Live(self.model_name, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
