"""Worker registry: who is there, who is healthy (active checks with consecutive thresholds), a per-worker
circuit breaker (passive, from request outcomes), and the load each worker reports at /get_load."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import orjson

from pdserve.router.config import (
    BreakerConfig, HealthConfig, RouterConfig, WorkerSpec, bootstrap_host_of, normalize_url,
)
from pdserve.router.metrics import RouterMetrics, WorkerCounters, WorkerGauges

logger = logging.getLogger(__name__)


def _key(url: str) -> str:
    try:
        return normalize_url(url)
    except ValueError:
        return url


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures, stays open `timeout_s`, then lets traffic probe
    (half-open) and closes after `success_threshold` successes; a failure while half-open reopens it."""

    __slots__ = ("cfg", "state", "failures", "successes", "opened_at")

    def __init__(self, cfg: BreakerConfig) -> None:
        self.cfg = cfg
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.successes = 0
        self.opened_at = 0.0

    def allows(self, now: float) -> bool:
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.cfg.timeout_s:
                return False
            self.state, self.successes = BreakerState.HALF_OPEN, 0
        return True

    def record(self, ok: bool, now: float) -> None:
        if not self.cfg.enabled:
            return
        if ok:
            self.failures = 0
            if self.state is BreakerState.HALF_OPEN:
                self.successes += 1
                if self.successes >= self.cfg.success_threshold:
                    self.state = BreakerState.CLOSED
            return
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.cfg.failure_threshold:
            self.state, self.opened_at, self.failures = BreakerState.OPEN, now, 0


@dataclass(eq=False)
class Worker:
    spec: WorkerSpec
    breaker: CircuitBreaker
    counters: WorkerCounters
    bootstrap_host: str
    healthy: bool = False
    checked: bool = False  # the first health result decides at once; thresholds apply afterwards
    health_failures: int = 0
    health_successes: int = 0
    inflight: int = 0  # requests this router has open on the worker
    polled_load: int | None = None  # num_reqs + num_waiting_reqs at the last /get_load poll
    inflight_at_poll: int = 0
    last_error: str | None = None
    down_waiters: set = field(default_factory=set)  # futures resolved when it turns unhealthy

    def wait_down(self) -> asyncio.Future:
        """A future resolved when this worker is next marked unhealthy (cancel it when no longer needed)."""
        fut = asyncio.get_running_loop().create_future()
        self.down_waiters.add(fut)
        fut.add_done_callback(self.down_waiters.discard)
        return fut

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def bootstrap_port(self) -> int | None:
        return self.spec.bootstrap_port

    def load(self) -> int:
        """Requests on the worker: the last polled value plus what this router sent (minus finished) since."""
        if self.polled_load is None:
            return self.inflight
        return max(0, self.polled_load + self.inflight - self.inflight_at_poll)

    def to_json(self) -> dict[str, object]:
        return {
            "url": self.url, "role": self.role, "bootstrap_port": self.bootstrap_port, "healthy": self.healthy,
            "circuit": self.breaker.state.value, "inflight": self.inflight, "load": self.load(),
            "last_error": self.last_error,
        }


class WorkerRegistry:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.health: HealthConfig = config.health
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None  # set by the router once the loop runs
        self.auth_headers: dict[str, str] = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._workers: dict[str, Worker] = {}
        self._by_role: dict[str, list[Worker]] = {"prefill": [], "decode": [], "regular": []}
        self._on_remove: list[Callable[[Worker], None]] = []
        metrics.watch_workers(self._gauges)

    # ---- membership ------------------------------------------------------------------------------------
    def on_remove(self, callback: Callable[[Worker], None]) -> None:
        self._on_remove.append(callback)

    def add(self, spec: WorkerSpec) -> Worker:
        """Registers the worker (out of rotation until its first health check passes). ValueError if it
        exists or its role does not fit the mode."""
        allowed = ("prefill", "decode") if self.config.pd_disaggregation else ("regular",)
        if spec.role not in allowed:
            raise ValueError(f"role {spec.role!r} is not valid in {'PD' if self.config.pd_disaggregation else 'non-PD'}"
                             f" mode (expected {' or '.join(allowed)})")
        if spec.url in self._workers:
            raise ValueError(f"worker {spec.url} is already registered")
        w = Worker(spec, CircuitBreaker(self.config.breaker), self.metrics.worker(spec.url, spec.role),
                   bootstrap_host_of(spec.url))
        if not self.health.enabled:
            w.healthy = w.checked = True
        self._workers[spec.url] = w
        self._by_role[spec.role] = self._by_role[spec.role] + [w]  # copy-on-write: iteration stays safe
        logger.info("worker added: %s (%s)", spec.url, spec.role)
        return w

    def remove(self, url: str) -> Worker | None:
        w = self._workers.pop(_key(url), None)
        if w is None:
            return None
        self._by_role[w.role] = [x for x in self._by_role[w.role] if x is not w]
        self.metrics.forget_worker(w.url, w.role)
        for cb in self._on_remove:
            cb(w)
        logger.info("worker removed: %s (%s)", w.url, w.role)
        return w

    def get(self, url: str) -> Worker | None:
        return self._workers.get(_key(url))

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def of_role(self, role: str) -> list[Worker]:
        return self._by_role[role]

    # ---- selection -------------------------------------------------------------------------------------
    def candidates(self, role: str, exclude: Iterable[Worker] = ()) -> list[Worker]:
        """Healthy workers whose circuit allows traffic, minus `exclude` (ignored if it would leave none); when
        every circuit is open, the healthy ones (fail open rather than refuse)."""
        now = time.monotonic()
        healthy = [w for w in self._by_role[role] if w.healthy]
        ok = [w for w in healthy if w.breaker.allows(now)] or healthy
        if exclude:
            rest = [w for w in ok if w not in exclude]
            return rest or ok
        return ok

    def ready(self) -> bool:
        if self.config.pd_disaggregation:  # a decode alone serves when it may prefill (decode-only fallback)
            prefill_ok = self.config.decode_fallback or any(w.healthy for w in self._by_role["prefill"])
            return prefill_ok and any(w.healthy for w in self._by_role["decode"])
        return any(w.healthy for w in self._by_role["regular"])

    def record(self, w: Worker, ok: bool, error: str | None = None) -> None:
        """A request outcome: feeds the circuit breaker."""
        w.breaker.record(ok, time.monotonic())
        if not ok:
            w.last_error = error
            w.counters.errors.inc()

    # ---- health ----------------------------------------------------------------------------------------
    async def probe(self, w: Worker) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(w.url + self.health.endpoint, headers=self.auth_headers,
                                        timeout=aiohttp.ClientTimeout(total=self.health.timeout_s)) as r:
                body = await r.read()
                ok = r.status == 200
                err = None if ok else f"health check answered {r.status}"
                draining = r.status == 503 and b"draining" in body[:4096]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, err, draining = False, f"health check failed: {type(e).__name__}: {e}", False
        self.apply_health(w, ok, err, draining)
        return ok

    def apply_health(self, w: Worker, ok: bool, error: str | None = None, draining: bool = False) -> None:
        """A health result. A draining worker leaves rotation but keeps the requests it has (no down signal)."""
        was, first = w.healthy, not w.checked
        if first:
            w.checked, w.healthy = True, ok
        elif ok:
            w.health_failures, w.health_successes = 0, w.health_successes + 1
            if not w.healthy and w.health_successes >= self.health.success_threshold:
                w.healthy = True
        else:
            w.health_successes, w.health_failures = 0, w.health_failures + 1
            if w.healthy and w.health_failures >= self.health.failure_threshold:
                w.healthy = False
                for fut in list(w.down_waiters) if not draining else ():
                    if not fut.done():
                        fut.set_result(None)
        if not ok:
            w.last_error = error
        if w.healthy != was or (first and not ok):
            logger.log(logging.INFO if w.healthy else logging.WARNING, "worker %s (%s) is %s%s", w.url, w.role,
                       "healthy" if w.healthy else "unhealthy", "" if ok else f": {error}")

    async def check_all(self) -> None:
        if self.health.enabled and self._workers:
            await asyncio.gather(*(self.probe(w) for w in self.all()))

    async def run_health_loop(self) -> None:
        """Probe every worker each interval; while the router cannot serve, probe every second."""
        while True:
            interval = self.health.interval_s if self.ready() else min(1.0, self.health.interval_s)
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await self.check_all()

    # ---- load ------------------------------------------------------------------------------------------
    async def poll_load(self, w: Worker) -> None:
        assert self.session is not None
        try:
            async with self.session.get(w.url + "/get_load", headers=self.auth_headers,
                                        timeout=aiohttp.ClientTimeout(total=self.health.timeout_s)) as r:
                if r.status != 200:
                    return
                data = orjson.loads(await r.read())
            ranks = data if isinstance(data, list) else [data]
            w.polled_load = sum(int(d.get("num_reqs", 0)) + int(d.get("num_waiting_reqs", 0)) for d in ranks)
            w.inflight_at_poll = w.inflight
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, TypeError, AttributeError):
            w.polled_load = None  # fall back to the router's own count

    async def run_load_loop(self, interval_s: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(self.poll_load(w) for w in self.all() if w.healthy))
            await asyncio.sleep(interval_s)

    def _gauges(self) -> list[WorkerGauges]:
        return [WorkerGauges(w.url, w.role, w.healthy, w.breaker.state is BreakerState.OPEN, w.inflight, w.load())
                for w in self._workers.values()]
