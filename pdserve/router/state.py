"""The router's parts wired together, with their lifecycle (HTTP session, health/load/eviction loops)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from pdserve.router.config import RouterConfig, WorkerSpec, normalize_url
from pdserve.router.kv_index import KVEventFeed
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import make_policy
from pdserve.router.proxy import Proxy
from pdserve.router.upstream import UpstreamClient
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger(__name__)

_KEEPALIVE_S = 15.0  # below the workers' own keep-alive (30 s), so that idle connections are ours to close


class RouterState:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.registry = WorkerRegistry(config, self.metrics)
        cache = config.cache_aware
        self.kv_feed = KVEventFeed(self.registry.auth_headers)  # kv_aware: the workers' KV events
        if config.pd_disaggregation:
            self.prefill_policy = make_policy(config.effective_prefill_policy, cache, self.kv_feed)
            self.decode_policy = make_policy(config.effective_decode_policy, cache, self.kv_feed)
            self.policies = [self.prefill_policy, self.decode_policy]
        else:
            self.prefill_policy = self.decode_policy = make_policy(config.policy, cache, self.kv_feed)
            self.policies = [self.decode_policy]
        self.proxy = Proxy(config, self.registry, self.metrics, self.prefill_policy, self.decode_policy)
        self.registry.on_remove(lambda w: [p.remove_worker(w.url) for p in self.policies])
        self.registry.on_remove(self._drop_connections)
        for spec in config.workers:
            self.registry.add(spec)
        self.session: aiohttp.ClientSession | None = None  # health, load polls, EPD encode calls
        self.client: UpstreamClient | None = None  # generation, info and control calls (the hot path)
        self._tasks: list[asyncio.Task] = []
        self.drain_requested = asyncio.Event()
        self.discovered: set[str] = set()  # worker URLs that came from --discovery (they also leave through it)

    def begin_drain(self, reason: str) -> None:
        if not self.proxy.draining:
            self.proxy.draining = True
            logger.info("draining (%s): %d requests in flight", reason, self.proxy.num_inflight)
            self.drain_requested.set()

    async def wait_drained(self, timeout_s: float, stop: asyncio.Event) -> bool:
        """Until no client request is in flight (True), or the timeout passes or `stop` is set (False)."""
        deadline = time.monotonic() + timeout_s
        while self.proxy.num_inflight and time.monotonic() < deadline and not stop.is_set():
            await asyncio.sleep(0.05)
        return not self.proxy.num_inflight

    def _drop_connections(self, w: Worker) -> None:
        if self.client is not None:
            self.client.forget(w.url)

    async def start(self) -> None:
        """Open the upstream session, run one round of health checks, start the background loops."""
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S,
                                         ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                        sock_connect=self.config.connect_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar())
        self.registry.session = self.proxy.session = self.session
        self.client = self.proxy.client = UpstreamClient(self.config.connect_timeout_s, self.config.request_timeout_s,
                                                         self.registry.auth_headers)
        await self.registry.check_all()
        loops = []
        if self.config.health.enabled:
            loops.append(self.registry.run_health_loop())
        if any(p.needs_load for p in self.policies):
            loops.append(self.registry.run_load_loop(self.config.load_poll_interval_s))
        if any(p.needs_text for p in self.policies):
            loops.append(self._evict_loop())
        if self.config.discovery is not None:
            from pdserve.discovery import DiscoveryConfig, Membership

            loops.append(Membership(DiscoveryConfig.parse(self.config.discovery), self._discovered,
                                    self._undiscovered).run())
        self._tasks = [asyncio.ensure_future(c) for c in loops]
        n_ok = sum(w.healthy for w in self.registry.all())
        logger.info("%d of %d workers healthy; %s", n_ok, len(self.registry.all()),
                    "ready" if self.registry.ready() else "not ready yet (no healthy pair)")

    async def _discovered(self, record) -> None:
        """A worker registered in etcd: added (and probed) unless it does not fit this router's mode."""
        spec = WorkerSpec(record.url, record.role, record.bootstrap_port if record.role == "prefill" else None)
        existing = self.registry.get(spec.url)
        if existing is not None:
            if existing.spec == spec or spec.url not in self.discovered:
                return  # known already (or listed on the command line, which wins)
            self._undiscovered(spec.url)
        try:
            w = self.registry.add(spec)  # refuses a role this router's mode does not take
        except ValueError as e:
            logger.info("discovery: ignoring %s: %s", record.url, e)
            return
        self.discovered.add(spec.url)
        logger.info("discovery: %s (%s) joined", spec.url, spec.role)
        if self.config.health.enabled:
            await self.registry.probe(w)

    def _undiscovered(self, url: str) -> None:
        try:
            url = normalize_url(url)
        except ValueError:
            return  # never added
        if url in self.discovered:
            self.discovered.discard(url)
            self.registry.remove(url)
            logger.info("discovery: %s left", url)

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.cache_aware.eviction_interval_s)
            for p in self.policies:
                try:
                    p.evict()
                except Exception:  # noqa: BLE001 - housekeeping must not die
                    logger.exception("cache tree eviction failed")

    async def close(self) -> None:
        self.kv_feed.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.client is not None:
            self.client.close()
        if self.session is not None:
            await self.session.close()
