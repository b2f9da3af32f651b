"""What an engine counts for /metrics: plain, cumulative numbers (the front turns them into SGLang's Prometheus
series; rates are taken between scrapes there). No tensors, no Prometheus here: the engine process only counts."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# SGLang's bucket bounds of sglang:queue_time_seconds (its SchedulerMetricsCollector).
QUEUE_TIME_BUCKETS_S: tuple[float, ...] = (
    0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400, 500, 600, 700, 800,
    900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000)


@dataclass
class CumulativeHistogram:
    """Counts per bucket (not cumulative across buckets; the last one is +Inf) and the sum, since start."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


@dataclass
class TransferFigures:
    """The latest finished KV transfer as one side saw it (SGLang reports the last one, not an average)."""

    speed_gb_s: float = 0.0
    latency_ms: float = 0.0
    bootstrap_ms: float = 0.0  # prefill: request arrival -> destination known; decode: arrival -> peer known
    alloc_ms: float = 0.0  # decode: waiting for KV memory before the destination could be sent
    total_mb: float = 0.0


@dataclass
class PDStats:
    """A PD side's queues and failures (gauges read now, counters since start)."""

    num_prefill_prealloc_queue_reqs: int = 0  # prefill: waiting for the decode's destination (bootstrap queue)
    num_prefill_inflight_queue_reqs: int = 0  # prefill: KV being written
    num_decode_prealloc_queue_reqs: int = 0  # decode: waiting for the prefill's layout or for KV memory
    num_decode_transfer_queue_reqs: int = 0  # decode: destination sent, KV on its way
    num_bootstrap_failed_reqs: int = 0
    num_transfer_failed_reqs: int = 0
    last_transfer: TransferFigures = field(default_factory=TransferFigures)

    def count_failure(self, in_bootstrap: bool) -> None:
        if in_bootstrap:
            self.num_bootstrap_failed_reqs += 1
        else:
            self.num_transfer_failed_reqs += 1

    def record_transfer(self, num_bytes: int, latency_s: float, bootstrap_s: float = 0.0, alloc_s: float = 0.0) -> None:
        self.last_transfer = TransferFigures(
            speed_gb_s=num_bytes / latency_s / 1e9 if latency_s > 0 else 0.0, latency_ms=latency_s * 1e3,
            bootstrap_ms=bootstrap_s * 1e3, alloc_ms=alloc_s * 1e3, total_mb=num_bytes / 1e6)


@dataclass
class EngineStats:
    """One engine's counters since start, sent with every LoadReport."""

    max_running_requests: int = 0
    kv_cache_bytes: int = 0  # this rank's KV pool
    num_retracted_reqs: int = 0  # preemptions (SGLang: retractions)
    num_generated_tokens: int = 0  # decode tokens sampled (the front derives gen_throughput between scrapes)
    num_admitted_prompt_tokens: int = 0  # prompt tokens at first admission ...
    num_admitted_cached_tokens: int = 0  # ... and those of them served from the prefix cache (cache_hit_rate)
    queue_time: CumulativeHistogram = field(default_factory=lambda: CumulativeHistogram(QUEUE_TIME_BUCKETS_S))
    pd: PDStats | None = None  # PD sides only
    time_s: float = field(default_factory=time.monotonic)  # when these were read
