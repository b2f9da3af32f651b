"""Prometheus metrics with SGLang's names, types and labels (a per-app registry), so SGLang's dashboards and SMG
read a pdserve worker unchanged.

Two groups, as SGLang splits them:
- request side (SGLang's TokenizerMetricsCollector; labels model_name, engine_type): token and request counters,
  TTFT / ITL / end-to-end histograms, observed here in the HTTP front;
- scheduler side (SchedulerMetricsCollector; labels model_name, engine_type, tp_rank, pp_rank, + dp_rank with
  --dp-size > 1): gauges, PD queues and transfer figures, queue-time histogram. The engine only counts
  (`engine/stats.py`); `EngineCollector` turns the latest load report of each dp rank into series at scrape time
  and derives rates (gen_throughput, cache_hit_rate) between two reports.
`SGLANG_METRIC_NAMES` lists every family a worker exports; tests compare it with SGLang's collector.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.engine.messages import LoadReport
from pdserve.engine.stats import EngineStats, PDStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_PROCESS_START = time.monotonic()  # this module is imported before the engine starts

# SGLang's default buckets (TokenizerMetricsCollector).
TTFT_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS_S = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
                 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)
E2E_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)

REQUEST_LABELS = ("model_name", "engine_type")
SCHEDULER_LABELS = ("model_name", "engine_type", "tp_rank", "pp_rank")  # + "dp_rank" with --dp-size > 1

# name -> (type, help); scheduler side. Counters are named without `_total` (the exposition adds it).
_SCHEDULER_GAUGES = {
    "num_running_reqs": "The number of running requests.",
    "num_queue_reqs": "The number of requests in the waiting queue.",
    "num_used_tokens": "The number of used tokens.",
    "token_usage": "The token usage.",
    "max_total_num_tokens": "Maximum total number of tokens in the KV cache pool.",
    "gen_throughput": "The generation throughput (token/s).",
    "cache_hit_rate": "The prefix cache hit rate.",
    "num_retracted_reqs": "The number of retracted requests.",
    "utilization": "The utilization.",
    "engine_startup_time": "The time taken for the engine to start up.",
    "num_prefill_prealloc_queue_reqs": "The number of requests in the prefill prealloc queue.",
    "num_prefill_inflight_queue_reqs": "The number of requests in the prefill inflight queue.",
    "num_decode_prealloc_queue_reqs": "The number of requests in the decode prealloc queue.",
    "num_decode_transfer_queue_reqs": "The number of requests in the decode transfer queue.",
    "kv_transfer_speed_gb_s": "The transfer speed of the KV cache in GB/s.",
    "kv_transfer_latency_ms": "The transfer latency of the KV cache in ms.",
    "kv_transfer_bootstrap_ms": "The bootstrap time of the KV transfer in ms.",
    "kv_transfer_alloc_ms": "The allocation waiting time of the KV transfer in ms.",
    "kv_transfer_total_mb": "The size of the latest KV transfer in MB.",
}
_SCHEDULER_COUNTERS = {
    "num_bootstrap_failed_reqs": "The number of bootstrap failed requests.",
    "num_transfer_failed_reqs": "The number of transfer failed requests.",
    "num_retracted_requests": "Total number of retracted requests.",
}
_REQUEST_COUNTERS = {
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
    "cached_tokens": "Number of cached prompt tokens.",
    "num_requests": "Number of requests processed.",
    "num_aborted_requests": "Number of requests aborted.",
}

# Every exported family as the scrape names it: (name, type, label names).
SGLANG_METRIC_NAMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    *((f"sglang:{n}", "gauge", SCHEDULER_LABELS) for n in _SCHEDULER_GAUGES),
    *((f"sglang:{n}_total", "counter", SCHEDULER_LABELS) for n in _SCHEDULER_COUNTERS),
    ("sglang:queue_time_seconds", "histogram", SCHEDULER_LABELS),
    *((f"sglang:{n}_total", "counter", REQUEST_LABELS) for n in _REQUEST_COUNTERS),
    ("sglang:time_to_first_token_seconds", "histogram", REQUEST_LABELS),
    ("sglang:inter_token_latency_seconds", "histogram", REQUEST_LABELS),
    ("sglang:e2e_request_latency_seconds", "histogram", REQUEST_LABELS),
)


def engine_type_of(disaggregation_mode: str) -> str:
    """SGLang's engine_type label: unified | prefill | decode."""
    return disaggregation_mode if disaggregation_mode in ("prefill", "decode") else "unified"


@dataclass
class _RankRates:
    """What the previous report of one dp rank said, to turn counters into rates."""

    stats: EngineStats
    gen_throughput: float = 0.0
    cache_hit_rate: float = 0.0
    num_retracted_reqs: int = 0


_MIN_RATE_WINDOW_S = 1.0  # reports closer together than this keep the previous rates


class EngineCollector:
    """Scheduler-side series, built at scrape time from each dp rank's latest LoadReport."""

    def __init__(self, model_name: str, engine_type: str, dp_size: int, startup_time_s: float) -> None:
        self._base = {"model_name": model_name, "engine_type": engine_type, "tp_rank": "0", "pp_rank": "0"}
        self._dp_size = dp_size
        self._startup_time_s = startup_time_s
        self._loads: list[LoadReport] = []
        self._rates: dict[int, _RankRates] = {}

    def update(self, loads: Sequence[LoadReport]) -> None:
        old = self._loads
        if len(old) == len(loads) and any(
                a.stats is not None and b.stats is not None and b.stats.time_s < a.stats.time_s
                for a, b in zip(old, loads)):
            return  # an older report than the one held (counters must not go backwards)
        self._loads = list(loads)
        for rank, load in enumerate(loads):
            if load.stats is not None:
                self._update_rates(rank, load.stats)

    def _update_rates(self, rank: int, now: EngineStats) -> None:
        prev = self._rates.get(rank)
        if prev is None:
            self._rates[rank] = _RankRates(now)
            return
        window_s = now.time_s - prev.stats.time_s
        if window_s < _MIN_RATE_WINDOW_S:
            return
        prev.gen_throughput = (now.num_generated_tokens - prev.stats.num_generated_tokens) / window_s
        new_prompt = now.num_admitted_prompt_tokens - prev.stats.num_admitted_prompt_tokens
        if new_prompt > 0:
            prev.cache_hit_rate = (now.num_admitted_cached_tokens - prev.stats.num_admitted_cached_tokens) / new_prompt
        prev.num_retracted_reqs = now.num_retracted_reqs - prev.stats.num_retracted_reqs
        prev.stats = now

    def _labels(self, rank: int) -> dict[str, str]:
        return {**self._base, "dp_rank": str(rank)} if self._dp_size > 1 else dict(self._base)

    @property
    def num_ranks(self) -> int:
        return len(self._loads) or self._dp_size

    def rank_load(self, rank: int) -> LoadReport:
        return self._loads[rank] if rank < len(self._loads) else LoadReport(0, 0, 0, 0, 0, 0)  # zeros before one

    def rank_kv_cache_bytes(self, rank: int) -> int:
        stats = self.rank_load(rank).stats
        return stats.kv_cache_bytes if stats is not None else 0

    def rank_values(self, rank: int) -> dict[str, float]:
        """Every scheduler-side gauge of one dp rank, by SGLang's name (without the prefix)."""
        load = self.rank_load(rank)
        stats = load.stats or EngineStats()
        pd = stats.pd or PDStats()
        rates = self._rates.get(rank) or _RankRates(stats)
        num_running = load.num_reqs - load.num_waiting_reqs - pd.num_decode_transfer_queue_reqs  # in the batch
        return {
            "num_running_reqs": num_running, "num_queue_reqs": load.num_waiting_reqs,
            "num_used_tokens": load.num_tokens, "max_total_num_tokens": load.max_total_tokens,
            "token_usage": load.num_tokens / load.max_total_tokens if load.max_total_tokens else 0.0,
            "gen_throughput": rates.gen_throughput, "cache_hit_rate": rates.cache_hit_rate,
            "num_retracted_reqs": rates.num_retracted_reqs,
            "utilization": num_running / stats.max_running_requests if stats.max_running_requests else 0.0,
            "engine_startup_time": self._startup_time_s,
            "num_prefill_prealloc_queue_reqs": pd.num_prefill_prealloc_queue_reqs,
            "num_prefill_inflight_queue_reqs": pd.num_prefill_inflight_queue_reqs,
            "num_decode_prealloc_queue_reqs": pd.num_decode_prealloc_queue_reqs,
            "num_decode_transfer_queue_reqs": pd.num_decode_transfer_queue_reqs,
            "kv_transfer_speed_gb_s": pd.last_transfer.speed_gb_s,
            "kv_transfer_latency_ms": pd.last_transfer.latency_ms,
            "kv_transfer_bootstrap_ms": pd.last_transfer.bootstrap_ms,
            "kv_transfer_alloc_ms": pd.last_transfer.alloc_ms,
            "kv_transfer_total_mb": pd.last_transfer.total_mb,
        }

    def collect(self) -> Iterator[Metric]:
        names = list(self._labels(0))
        gauges = {n: GaugeMetricFamily(f"sglang:{n}", doc, labels=names) for n, doc in _SCHEDULER_GAUGES.items()}
        counters = {n: CounterMetricFamily(f"sglang:{n}", doc, labels=names) for n, doc in _SCHEDULER_COUNTERS.items()}
        queue_time = HistogramMetricFamily("sglang:queue_time_seconds", "Histogram of queueing time in seconds.",
                                           labels=names)
        for rank in range(self.num_ranks):
            labels = list(self._labels(rank).values())
            values = self.rank_values(rank)
            stats = self.rank_load(rank).stats or EngineStats()
            pd = stats.pd or PDStats()
            for name, family in gauges.items():
                family.add_metric(labels, float(values[name]))
            counters["num_bootstrap_failed_reqs"].add_metric(labels, pd.num_bootstrap_failed_reqs)
            counters["num_transfer_failed_reqs"].add_metric(labels, pd.num_transfer_failed_reqs)
            counters["num_retracted_requests"].add_metric(labels, stats.num_retracted_reqs)
            hist = stats.queue_time
            cumulative, buckets = 0, []
            for bound, count in zip((*hist.bounds, float("inf")), hist.counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            queue_time.add_metric(labels, buckets, hist.sum)
        yield from gauges.values()
        yield from counters.values()
        yield queue_time


class ServerMetrics:
    def __init__(self, model_name: str, engine_type: str = "unified", dp_size: int = 1) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine_type": engine_type}
        names = list(labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sglang:{name}", doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(**labels)

        self.engine = EngineCollector(model_name, engine_type, dp_size, time.monotonic() - _PROCESS_START)
        self.registry.register(self.engine)
        self.num_http_reqs = Gauge("pdserve:num_active_requests", "Requests open in the HTTP front", names,
                                   registry=self.registry).labels(**labels)
        self.prompt_tokens = counter("prompt_tokens", _REQUEST_COUNTERS["prompt_tokens"])
        self.generation_tokens = counter("generation_tokens", _REQUEST_COUNTERS["generation_tokens"])
        self.cached_tokens = counter("cached_tokens", _REQUEST_COUNTERS["cached_tokens"])
        self.num_requests = counter("num_requests", _REQUEST_COUNTERS["num_requests"])
        self.num_aborted_requests = counter("num_aborted_requests", _REQUEST_COUNTERS["num_aborted_requests"])
        self.ttft = histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS_S)
        self.itl = histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS_S)
        self.e2e = histogram("sglang:e2e_request_latency_seconds",
                             "Histogram of End-to-end request latency in seconds", E2E_BUCKETS_S)

    def update_loads(self, loads: Sequence[LoadReport]) -> None:
        """The latest load report of each dp rank (in rank order)."""
        self.engine.update(loads)

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
