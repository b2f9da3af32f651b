"""Prometheus metrics (SGLang names, `sglang:` prefix) on a per-app registry."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.engine.messages import LoadReport

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                    60.0, 120.0, 300.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.0, 5.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(**labels)

        self.num_running_reqs = gauge("sglang:num_running_reqs", "Requests running in the engine")
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "Requests waiting in the engine queue")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "KV cache slots in use")
        self.max_total_num_tokens = gauge("sglang:max_total_num_tokens", "KV cache size in tokens")
        self.token_usage = gauge("sglang:token_usage", "Fraction of the KV cache in use")
        self.num_http_reqs = gauge("pdserve:num_active_requests", "Requests open in the HTTP front")
        self.prompt_tokens = counter("sglang:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("sglang:generation_tokens", "Tokens generated")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens served from the prefix cache")
        self.num_requests = counter("sglang:num_requests", "Requests finished")
        self.num_aborted_requests = counter("sglang:num_aborted_requests", "Requests aborted or failed")
        self.ttft = histogram("sglang:time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = histogram("sglang:inter_token_latency_seconds", "Time between output tokens", _ITL_BUCKETS)
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "End-to-end request latency", _LATENCY_BUCKETS)

    def update_load(self, load: LoadReport) -> None:
        self.num_running_reqs.set(load.num_reqs)
        self.num_queue_reqs.set(load.num_waiting_reqs)
        self.num_used_tokens.set(load.num_tokens)
        self.max_total_num_tokens.set(load.max_total_tokens)
        self.token_usage.set(load.num_tokens / load.max_total_tokens if load.max_total_tokens else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_request(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one request."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self.start = time.perf_counter()
        self._last: float | None = None
        self._m.num_http_reqs.inc()

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.observe(now - self.start)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._m.itl.observe(gap)
        self._last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def on_finish(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, aborted: bool) -> None:
        self._m.num_http_reqs.dec()
        self._m.e2e.observe(self.elapsed())
        self._m.prompt_tokens.inc(prompt_tokens)
        self._m.generation_tokens.inc(completion_tokens)
        self._m.cached_tokens.inc(cached_tokens)
        self._m.num_requests.inc()
        if aborted:
            self._m.num_aborted_requests.inc()
