"""Membership through etcd: `--discovery etcd://HOST:PORT[/PREFIX]` on servers and on the router.

A server registers one record (its URL, role and bootstrap port) under `PREFIX + ROLE/HOST:PORT`, attached to a
lease of `--discovery-ttl` seconds that it keeps alive (every third of the TTL); it withdraws the record (revokes
the lease) when it starts to drain, and a killed server's record goes when its lease expires. If etcd is away or
forgot the lease, the server registers again once etcd answers. The router lists the prefix, then watches it: a
record that appears adds a worker, one that goes removes it; while etcd is unreachable the router keeps the last
membership it knew and tries again with backoff (then lists once more, so nothing missed in between is lost).

etcd is reached through its v3 JSON gateway (/v3/kv/range, /v3/watch, /v3/lease/*), the documented HTTP form of
the API etcdctl uses, with aiohttp: the Python etcd3 client packages are unmaintained (old protobuf/grpc pins)
and this needs six calls. Records are typed (msgspec, schema-checked); one that does not decode is skipped with a
log line. Every call has a deadline; an idle watch is restarted every WATCH_IDLE_S so that a vanished etcd is
noticed too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import msgspec
import orjson

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "/pdserve/workers/"
DEFAULT_TTL_S = 10.0
CALL_TIMEOUT_S = 5.0
WATCH_IDLE_S = 30.0  # a watch with no event for this long is restarted (after a fresh list)
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0
ROLES = ("prefill", "decode", "regular")


@dataclass(frozen=True)
class DiscoveryConfig:
    endpoint: str  # http://host:port of an etcd client URL
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def parse(cls, url: str) -> DiscoveryConfig:
        """`etcd://HOST:PORT[/PREFIX]`; ValueError otherwise."""
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.hostname:
            raise ValueError(f"--discovery must look like etcd://HOST:PORT[/PREFIX], got {url!r}")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"--discovery has an invalid port: {url!r}") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        prefix = parts.path.rstrip("/") + "/" if parts.path not in ("", "/") else DEFAULT_PREFIX
        return cls(f"http://{host}:{port}", prefix)


class WorkerRecord(msgspec.Struct, frozen=True):
    """What a server publishes about itself (the value of its key)."""

    url: str
    role: str  # prefill | decode | regular
    bootstrap_port: int | None = None  # prefill only
    model: str = ""


_RECORD_DECODER = msgspec.json.Decoder(WorkerRecord)


def decode_record(value: bytes) -> WorkerRecord | None:
    try:
        record = _RECORD_DECODER.decode(value)
    except msgspec.DecodeError as e:
        logger.warning("ignoring a discovery record that does not decode: %s", e)
        return None
    if record.role not in ROLES:
        logger.warning("ignoring a discovery record with role %r", record.role)
        return None
    return record


def advertised_host(host: str) -> str:
    """The host others reach a server at: its bind host, or this machine's name when it binds every address."""
    return socket.getfqdn() if host in ("0.0.0.0", "::", "") else host


def advertised_url(host: str, port: int) -> str:
    host = advertised_host(host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def record_key(prefix: str, record: WorkerRecord) -> str:
    return prefix + record.role + "/" + urlsplit(record.url).netloc


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte incremented."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


class EtcdError(Exception):
    """etcd could not be reached, or answered with an error."""


class EtcdClient:
    def __init__(self, endpoint: str, session: aiohttp.ClientSession) -> None:
        self.endpoint, self.session = endpoint, session

    async def _call(self, path: str, body: dict) -> dict:
        try:
            async with self.session.post(self.endpoint + path, data=orjson.dumps(body),
                                         timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as r:
                answer = orjson.loads(await r.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError) as e:
            raise EtcdError(f"etcd at {self.endpoint} {path}: {type(e).__name__}: {e}") from None
        if r.status != 200 or not isinstance(answer, dict) or "error" in answer:
            raise EtcdError(f"etcd at {self.endpoint} {path} answered {r.status}: {str(answer)[:300]}")
        return answer

    async def grant(self, ttl_s: float) -> str:
        return str((await self._call("/v3/lease/grant", {"TTL": max(1, round(ttl_s))}))["ID"])

    async def keepalive(self, lease: str) -> int:
        """The lease's remaining TTL in seconds; 0 when etcd no longer has it."""
        result = (await self._call("/v3/lease/keepalive", {"ID": lease})).get("result", {})
        return int(result.get("TTL", 0))

    async def revoke(self, lease: str) -> None:
        await self._call("/v3/lease/revoke", {"ID": lease})

    async def put(self, key: str, value: bytes, lease: str) -> None:
        await self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": lease})

    async def list_prefix(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        """(revision, {key: value}) of every key under the prefix."""
        answer = await self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        kvs = {base64.b64decode(kv["key"]).decode(errors="replace"): base64.b64decode(kv.get("value", ""))
               for kv in answer.get("kvs", [])}
        return int(answer["header"]["revision"]), kvs

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[str, str, bytes]]:
        """(PUT | DELETE, key, value) for each change under the prefix from start_revision on; returns when the
        watch was idle WATCH_IDLE_S; EtcdError when the stream breaks or etcd compacted past start_revision."""
        body = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                   "start_revision": start_revision}}
        try:
            async with self.session.post(self.endpoint + "/v3/watch", data=orjson.dumps(body),
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=CALL_TIMEOUT_S)) as r:
                if r.status != 200:
                    raise EtcdError(f"etcd at {self.endpoint} /v3/watch answered {r.status}")
                while True:
                    try:
                        line = await asyncio.wait_for(r.content.readline(), WATCH_IDLE_S)
                    except asyncio.TimeoutError:
                        return
                    if not line:
                        raise EtcdError(f"etcd at {self.endpoint} closed the watch")
                    result = orjson.loads(line).get("result", {})
                    if result.get("compact_revision") or result.get("canceled"):
                        raise EtcdError(f"etcd cancelled the watch: {str(result)[:300]}")
                    for ev in result.get("events", []):
                        kv = ev.get("kv", {})
                        yield (ev.get("type", "PUT"), base64.b64decode(kv.get("key", "")).decode(errors="replace"),
                               base64.b64decode(kv.get("value", "")))
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError, ValueError) as e:
            raise EtcdError(f"etcd at {self.endpoint} watch: {type(e).__name__}: {e}") from None


def _backoff(attempt: int) -> float:
    return min(RETRY_MAX_S, RETRY_MIN_S * 2 ** attempt) * random.uniform(0.8, 1.2)


class Registration:
    """A server's record, on a lease kept alive; see the module docstring."""

    def __init__(self, config: DiscoveryConfig, record: WorkerRecord, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.config, self.record, self.ttl_s = config, record, ttl_s
        self.key = record_key(config.prefix, record)
        self.lease: str | None = None
        self.registered = False  # the record is in etcd under self.lease
        self.withdrawn = False
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._task = asyncio.ensure_future(self._run(EtcdClient(self.config.endpoint, self._session)))

    async def _run(self, etcd: EtcdClient) -> None:
        failures = 0
        while not self.withdrawn:
            try:
                if self.lease is None:
                    self.lease = await etcd.grant(self.ttl_s)  # known at once: withdraw() revokes it
                if not self.registered:
                    await etcd.put(self.key, msgspec.json.encode(self.record), self.lease)
                    self.registered = True
                    logger.info("registered %s in etcd %s (lease %s, ttl %.0f s)", self.key, self.config.endpoint,
                                self.lease, self.ttl_s)
                await asyncio.sleep(self.ttl_s / 3)
                if await etcd.keepalive(self.lease) <= 0:
                    logger.warning("etcd forgot the lease of %s: registering again", self.key)
                    self.lease, self.registered = None, False
                failures = 0
            except Exception as e:  # noqa: BLE001 - etcd away or answering oddly: keep trying, never die
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning("discovery: %s: %s (retrying)", type(e).__name__, e)
                await asyncio.sleep(_backoff(failures))

    async def withdraw(self) -> None:
        """Remove the record now (drain or stop); best effort: the lease expires anyway."""
        if self.withdrawn:
            return
        self.withdrawn = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.lease is not None and self._session is not None:
            try:
                await EtcdClient(self.config.endpoint, self._session).revoke(self.lease)
                logger.info("withdrew %s from etcd", self.key)
            except EtcdError as e:
                logger.warning("could not withdraw %s from etcd (its lease expires): %s", self.key, e)
        if self._session is not None:
            await self._session.close()


class Membership:
    """The router's view of the records under the prefix: `on_add(record)` for each new or changed one,
    `on_remove(url)` for each that went; see the module docstring."""

    def __init__(self, config: DiscoveryConfig, on_add: Callable[[WorkerRecord], Awaitable[None]],
                 on_remove: Callable[[str], None]) -> None:
        self.config, self.on_add, self.on_remove = config, on_add, on_remove
        self.records: dict[str, WorkerRecord] = {}  # key -> record, as last known
        self.synced = asyncio.Event()  # set after the first successful list

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            etcd = EtcdClient(self.config.endpoint, session)
            failures = 0
            while True:
                try:
                    revision, kvs = await etcd.list_prefix(self.config.prefix)
                    await self._reconcile(kvs)
                    self.synced.set()
                    failures = 0
                    async for kind, key, value in etcd.watch(self.config.prefix, revision + 1):
                        await self._apply(kind, key, value)
                except Exception as e:  # noqa: BLE001 - etcd away or answering oddly: keep the membership
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        logger.warning("discovery: %s: %s; keeping the %d workers known (retrying)",
                                       type(e).__name__, e, len(self.records))
                    await asyncio.sleep(_backoff(failures))

    async def _reconcile(self, kvs: dict[str, bytes]) -> None:
        for key in [k for k in self.records if k not in kvs]:
            await self._apply("DELETE", key, b"")
        for key, value in kvs.items():
            await self._apply("PUT", key, value)

    async def _apply(self, kind: str, key: str, value: bytes) -> None:
        old = self.records.get(key)
        if kind == "DELETE":
            if old is not None:
                del self.records[key]
                self.on_remove(old.url)
            return
        record = decode_record(value)
        if record is not None and record_key(self.config.prefix, record) != key:
            logger.warning("ignoring the discovery record under %s: it names %s (%s)", key, record.url, record.role)
            record = None
        if record is None or record == old:
            return
        if old is not None:
            self.on_remove(old.url)
        self.records[key] = record
        with contextlib.suppress(ValueError):
            await self.on_add(record)
