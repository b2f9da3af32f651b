"""Prometheus metrics of the router (a per-router registry). Labelled children are cached so that the hot path
does a dict lookup and an increment, nothing more."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            300.0, 600.0)


@dataclass(frozen=True)
class WorkerGauges:
    """What the /metrics scrape reports per worker (read from the registry at scrape time)."""

    url: str
    role: str
    healthy: bool
    breaker_open: bool
    inflight: int
    load: int


@dataclass(frozen=True)
class WorkerCounters:
    """Labelled children for one worker."""

    requests: object
    errors: object
    duration: object


@dataclass(frozen=True)
class RouteCounters:
    requests: object
    retries: object
    duration: object
    decode_fallbacks: object
    migrations: object


class _WorkerCollector:
    def __init__(self, source: Callable[[], Iterable[WorkerGauges]]) -> None:
        self._source = source

    def collect(self):
        labels = ["worker", "role"]
        healthy = GaugeMetricFamily("pdserve_router_worker_healthy", "1 if the worker is in rotation", labels=labels)
        breaker = GaugeMetricFamily("pdserve_router_worker_circuit_open", "1 if the worker's circuit is open",
                                    labels=labels)
        inflight = GaugeMetricFamily("pdserve_router_worker_inflight", "Requests this router has open on the worker",
                                     labels=labels)
        load = GaugeMetricFamily("pdserve_router_worker_load", "Load the router uses for the worker (requests)",
                                 labels=labels)
        for g in self._source():
            lv = [g.url, g.role]
            healthy.add_metric(lv, float(g.healthy))
            breaker.add_metric(lv, float(g.breaker_open))
            inflight.add_metric(lv, float(g.inflight))
            load.add_metric(lv, float(g.load))
        return [healthy, breaker, inflight, load]


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter("pdserve_router_requests", "Requests received, by route", ["route"], registry=r)
        self._errors = Counter("pdserve_router_request_errors", "Requests answered with an error, by route and reason",
                               ["route", "reason"], registry=r)
        self._retries = Counter("pdserve_router_retries", "Retries on another worker (pair), by route", ["route"],
                                registry=r)
        self._fallbacks = Counter("pdserve_router_decode_fallbacks", "PD requests sent to a decode alone (it "
                                  "prefills them) because no prefill was healthy, by route", ["route"], registry=r)
        self._migrations = Counter("pdserve_router_migrations", "Streams continued on another worker (pair) after "
                                   "theirs failed or stalled mid-stream, by route", ["route"], registry=r)
        self._duration = Histogram("pdserve_router_request_duration_seconds", "Router request latency, by route",
                                   ["route"], buckets=_BUCKETS, registry=r)
        self._w_requests = Counter("pdserve_router_worker_requests", "Requests sent to each worker",
                                   ["worker", "role"], registry=r)
        self._w_errors = Counter("pdserve_router_worker_errors", "Failed requests (5xx or connection) per worker",
                                 ["worker", "role"], registry=r)
        self._w_duration = Histogram("pdserve_router_worker_request_duration_seconds",
                                     "Upstream request latency per worker", ["worker", "role"], buckets=_BUCKETS,
                                     registry=r)
        self._routes: dict[str, RouteCounters] = {}
        self._error_children: dict[tuple[str, str], object] = {}

    def watch_workers(self, source: Callable[[], Iterable[WorkerGauges]]) -> None:
        self.registry.register(_WorkerCollector(source))

    def route(self, name: str) -> RouteCounters:
        rc = self._routes.get(name)
        if rc is None:
            rc = self._routes[name] = RouteCounters(self._requests.labels(name), self._retries.labels(name),
                                                    self._duration.labels(name), self._fallbacks.labels(name),
                                                    self._migrations.labels(name))
        return rc

    def error(self, route: str, reason: str) -> None:
        child = self._error_children.get((route, reason))
        if child is None:
            child = self._error_children[(route, reason)] = self._errors.labels(route, reason)
        child.inc()

    def worker(self, url: str, role: str) -> WorkerCounters:
        return WorkerCounters(self._w_requests.labels(url, role), self._w_errors.labels(url, role),
                              self._w_duration.labels(url, role))

    def forget_worker(self, url: str, role: str) -> None:
        for m in (self._w_requests, self._w_errors, self._w_duration):
            try:
                m.remove(url, role)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
