"""Proxying: pick a worker (pair), send, relay the answer, retry on another one while nothing reached the client.

PD mode (--dispatch parallel, SGLang's) sends the same body (with bootstrap fields) to a prefill and a decode at
once and answers with the decode's response; decode-first sends the decode's leg before the prefill's; prefill-first
(vLLM's) waits for the prefill's one-token answer and sends the decode its kv_transfer_params. Both legs run as
tasks; when the prefill fails, a done-callback cancels the decode leg (or closes its connection while relaying), and
when the decode fails, the prefill leg is cancelled: no leg waits for a timeout. Closing an upstream connection
makes the worker abort the request. Upstream requests go through upstream.UpstreamClient (keep-alive pools;
aiohttp's client cost several times the CPU per request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from pdserve.router import payload
from pdserve.router.config import RetryConfig, RouterConfig
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Policy
from pdserve.router.upstream import Response, Stalled, UpstreamClient, UpstreamError
from pdserve.router.workers import Worker, WorkerRegistry
from pdserve.server.errors import error_body

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_NET_ERRORS = (UpstreamError, aiohttp.ClientError, asyncio.TimeoutError, OSError)
_JSON = "application/json"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Endpoint:
    kind: str  # payload.GENERATE | COMPLETIONS | CHAT (also the metrics label)
    path: str  # upstream path


class Failure(Exception):
    """An attempt that failed before any byte reached the client: what to answer if it is the last one."""

    def __init__(self, status: int, body: bytes, content_type: str, reason: str, retryable: bool,
                 workers: tuple[Worker, ...] = ()) -> None:
        super().__init__(reason)
        self.status, self.body, self.content_type = status, body, content_type
        self.reason, self.retryable, self.workers = reason, retryable, workers

    @classmethod
    def message(cls, status: int, message: str, reason: str, retryable: bool,
                workers: tuple[Worker, ...] = ()) -> Failure:
        return cls(status, orjson.dumps(error_body(message, status)), _JSON, reason, retryable, workers)

    @classmethod
    def network(cls, w: Worker, e: BaseException, during: str) -> Failure:
        timeout = isinstance(e, asyncio.TimeoutError)
        status = 504 if timeout else 502
        return cls.message(status, f"{w.role} worker {w.url} failed {during}: {type(e).__name__}: {e}".rstrip(": "),
                           "timeout" if timeout else "unreachable", True, (w,))

    @classmethod
    def answered(cls, w: Worker, status: int, body: bytes, content_type: str) -> Failure:
        """A worker's own error answer: passed through unchanged; 4xx (but 408/429) are the client's problem."""
        return cls(status, body, content_type, "upstream_5xx" if status >= 500 else "upstream_4xx",
                   status in RETRYABLE_STATUS, (w,))

    def response(self) -> web.Response:
        return web.Response(body=self.body, status=self.status, headers={"Content-Type": self.content_type})


def _cancelling() -> bool:
    """Whether the current task is being cancelled (the client went away), as opposed to a leg we cancelled."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


class _Link:
    """Ties the legs of one PD attempt: when the prefill fails, the decode leg is cancelled (before its answer
    began) or its connection closed (while relaying), at once."""

    __slots__ = ("d_task", "d_resp", "p_failure")

    def __init__(self) -> None:
        self.d_task: asyncio.Task | None = None
        self.d_resp: Response | None = None
        self.p_failure: Failure | None = None

    def on_prefill_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if not isinstance(exc, Failure):
            return
        self.p_failure = exc
        if self.d_task is not None and not self.d_task.done():
            self.d_task.cancel()
        if self.d_resp is not None:
            self.d_resp.close()  # a pending read of the relay wakes up with an error


class _Migration:
    """A stream the router may continue on another pair (stream migration): what re-issuing it needs, the
    tracker of what the client got, and the client's response once it began."""

    __slots__ = ("ep", "body", "text", "tokens", "tracker", "excluded", "out", "count", "clean", "released")

    def __init__(self, ep: Endpoint, body: dict, text: str | None, tokens: list[int] | None,
                 tracker: payload.StreamTracker) -> None:
        self.ep, self.body, self.text, self.tokens, self.tracker = ep, body, text, tokens, tracker
        self.excluded: list[Worker] = []
        self.out: web.StreamResponse | None = None
        self.count = 0  # migrations so far
        self.clean = False  # whether the client's stream ended cleanly
        self.released: list[Worker] = []  # failed workers whose in-flight count the migration gave back early


class RetryBudget:
    """Token bucket: every request deposits `budget_ratio` tokens, time adds `budget_min_per_s` per second, a
    retry spends one; bounds retry storms when a whole fleet fails."""

    def __init__(self, cfg: RetryConfig) -> None:
        self.ratio, self.rate = cfg.budget_ratio, cfg.budget_min_per_s
        self.cap = max(10.0, 10.0 * cfg.budget_min_per_s)
        self.tokens, self.t = self.cap, time.monotonic()

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        now = time.monotonic()
        self.tokens, self.t = min(self.cap, self.tokens + (now - self.t) * self.rate), now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Proxy:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, metrics: RouterMetrics,
                 prefill_policy: Policy, decode_policy: Policy) -> None:
        self.config, self.registry, self.metrics = config, registry, metrics
        self.pd = config.pd_disaggregation
        self.prefill_policy, self.decode_policy = prefill_policy, decode_policy  # non-PD: decode_policy only
        self.needs_text = decode_policy.needs_text or (self.pd and prefill_policy.needs_text)
        self.tokenizer = None  # kv_aware: the request's token ids
        if decode_policy.needs_tokens or (self.pd and prefill_policy.needs_tokens):
            from pdserve.router.tokens import RouteTokenizer

            self.tokenizer = RouteTokenizer(config.tokenizer_path)
        self.retry = config.retry
        self.budget = RetryBudget(config.retry)
        self.session: aiohttp.ClientSession | None = None  # EPD encode calls
        self.client: UpstreamClient | None = None  # generation, info and control calls
        self._background: set[asyncio.Task] = set()
        self.migrates = config.migration_limit > 0
        self.num_inflight = 0  # client requests being answered (a drain waits for 0)
        self.draining = False  # set by a drain: new requests are refused with 503

    # ---- entry point -----------------------------------------------------------------------------------
    async def forward(self, request: web.Request, ep: Endpoint) -> web.StreamResponse:
        rc = self.metrics.route(ep.kind)
        rc.requests.inc()
        if self.draining:
            self.metrics.error(ep.kind, "draining")
            return Failure.message(503, "this router is draining (shutting down)", "draining", False).response()
        t0 = time.perf_counter()
        self.num_inflight += 1
        try:
            raw = await request.read()
            body = None
            if (self.pd or self.needs_text or self.tokenizer is not None or self.config.encode_urls
                    or (self.migrates and b'"stream"' in raw)):
                try:
                    body = payload.parse_object(raw)
                except payload.BadRequest as e:
                    self.metrics.error(ep.kind, "bad_request")
                    return Failure.message(400, str(e), "bad_request", False).response()
            text = payload.routing_text(ep.kind, body) if self.needs_text else None
            tokens = self.tokenizer.token_ids(ep.kind, body) if self.tokenizer is not None else None
            mig = None
            if self.migrates and payload.migratable(ep.kind, body):
                assert body is not None
                strip = False
                if ep.kind != payload.GENERATE:  # OpenAI streams carry their token ids only when asked
                    strip = body.get("return_token_ids") is not True
                    body = {**body, "return_token_ids": True}
                    raw = orjson.dumps(body)
                mig = _Migration(ep, dict(body), text, tokens,  # before any injection
                                 payload.StreamTracker(ep.kind, strip))
            return await self._with_retries(request, ep, raw, body, text, mig, tokens)
        finally:
            self.num_inflight -= 1
            rc.duration.observe(time.perf_counter() - t0)

    async def _with_retries(self, request: web.Request, ep: Endpoint, raw: bytes, body: dict | None,
                            text: str | None, mig: _Migration | None = None,
                            tokens: list[int] | None = None) -> web.StreamResponse:
        self.budget.deposit()
        excluded: list[Worker] = []
        attempt = 0
        while True:
            try:
                prefill, worker = self._pick(text, excluded, tokens)
                if self.pd and prefill is None:
                    self.metrics.route(ep.kind).decode_fallbacks.inc()
                if self.config.encode_urls and body is not None:
                    raw, body = await self._encode(ep, raw, body)
                return await self._attempt(request, ep, raw, body, prefill, worker, mig)
            except Failure as f:
                failure = f
            if not failure.retryable or attempt >= self.retry.max_retries or not self.budget.withdraw():
                break
            excluded.extend(failure.workers)
            attempt += 1
            self.metrics.route(ep.kind).retries.inc()
            logger.info("retry %d of %s: %s", attempt, ep.path, failure.reason)
            await asyncio.sleep(self._backoff(attempt))
        self.metrics.error(ep.kind, failure.reason)
        return failure.response()

    async def _encode(self, ep: Endpoint, raw: bytes, body: dict) -> tuple[bytes, dict]:
        """EPD: encode the request's images (every attempt gets a fresh room: encoders drop an embedding
        once it was fetched) and add the `epd` field the language servers read."""
        from pdserve.epd import dispatch as epd

        images = epd.extract_images(ep.path, body)
        if not images:
            return raw, body
        try:
            field = await epd.encode_images(self.session, self.config.encode_urls, images,
                                            headers=self.registry.auth_headers)
        except epd.EncodeFailure as f:
            raise Failure(f.status, f.body(), "application/json", "encode_failed", f.status >= 500) from None
        body = {**body, "epd": field}
        return orjson.dumps(body), body

    def _backoff(self, attempt: int) -> float:
        r = self.retry
        delay = min(r.max_backoff_ms, r.initial_backoff_ms * r.backoff_multiplier ** (attempt - 1))
        return max(0.0, delay * (1.0 + r.jitter_factor * random.uniform(-1.0, 1.0))) / 1000.0

    def _pick(self, text: str | None, excluded: list[Worker],
              tokens: list[int] | None = None) -> tuple[Worker | None, Worker]:
        if not self.pd:
            ws = self.registry.candidates("regular", excluded)
            if not ws:
                raise Failure.message(503, "no healthy worker available", "no_workers", False)
            return None, self.decode_policy.select(ws, text, tokens)
        ds = self.registry.candidates("decode", excluded)
        if not ds:
            raise Failure.message(503, "no healthy decode worker available", "no_workers", False)
        ps = self.registry.candidates("prefill")
        fresh = [w for w in ps if w not in excluded]
        if not fresh and self.config.decode_fallback:
            # Decode-only fallback: no healthy prefill (or each failed this request); the decode prefills locally.
            return None, self.decode_policy.select(ds, text, tokens)
        if not ps:
            raise Failure.message(503, "no healthy prefill worker available", "no_workers", False)
        if self.config.dispatch == "decode-first":
            decode = self.decode_policy.select(ds, text, tokens)
            return self.prefill_policy.select(fresh or ps, text, tokens), decode
        return self.prefill_policy.select(fresh or ps, text, tokens), self.decode_policy.select(ds, text, tokens)

    # ---- one attempt -----------------------------------------------------------------------------------
    async def _attempt(self, request: web.Request, ep: Endpoint, raw: bytes, body: dict | None,
                       prefill: Worker | None, worker: Worker, mig: _Migration | None = None) -> web.StreamResponse:
        data = raw
        if (prefill is not None and self.config.dispatch == "prefill-first"
                and payload.kv_transferable(ep.kind, body)):  # type: ignore[arg-type]
            data, prefill = await self._prefill_first(prefill, ep, body), None  # type: ignore[arg-type]
        elif prefill is not None:
            assert body is not None
            data = payload.inject_bootstrap(body, prefill.bootstrap_host, prefill.bootstrap_port,
                                            payload.batch_size(ep.kind, body))
        merge = prefill is not None and payload.wants_input_logprobs(ep.kind, body)  # type: ignore[arg-type]
        link = _Link()
        p_task = None
        resp: Response | None = None
        clean = False
        t0 = time.perf_counter()
        worker.inflight += 1
        worker.counters.requests.inc()
        try:
            if prefill is None and mig is None:
                resp, chunk, streaming = await self._head(worker, ep.path, data)
            elif prefill is None:  # a stream from one worker: watched for its health until its first byte
                link.d_task = asyncio.ensure_future(self._head(worker, ep.path, data))
                await self._watch_head(link.d_task, None, worker)
                resp, chunk, streaming = await link.d_task
                link.d_task = None
            else:
                if self.config.dispatch == "decode-first":
                    link.d_task = asyncio.ensure_future(self._head(worker, ep.path, data))
                p_task = asyncio.ensure_future(self._prefill_leg(prefill, ep.path, data))
                if link.d_task is None:
                    link.d_task = asyncio.ensure_future(self._head(worker, ep.path, data))
                p_task.add_done_callback(link.on_prefill_done)
                if mig is not None:
                    await self._watch_head(link.d_task, p_task, worker)
                try:
                    resp, chunk, streaming = await link.d_task
                except asyncio.CancelledError:
                    if link.p_failure is not None and not _cancelling():
                        raise link.p_failure from None
                    raise
                # A migratable stream that began has its KV: a later prefill failure does not end it.
                link.d_task, link.d_resp = None, (resp if mig is None else None)
                if link.p_failure is not None and streaming and mig is None:  # the prefill failed in between
                    raise link.p_failure
            if streaming:
                out, clean = await self._relay(request, worker, resp, chunk, p_task if merge else None, link, mig)
                return out
            clean = True
            self.registry.record(worker, True)
            if merge:
                with contextlib.suppress(Failure):
                    chunk = payload.merge_input_logprobs(await p_task, chunk)  # type: ignore[misc]
            return web.Response(body=chunk, status=resp.status,
                                headers={"Content-Type": resp.header("content-type", _JSON)})
        finally:
            if mig is not None and worker in mig.released:
                mig.released.remove(worker)  # counted out when its stream moved on
            else:
                worker.inflight -= 1
                worker.counters.duration.observe(time.perf_counter() - t0)
            if link.d_task is not None and not link.d_task.done():
                link.d_task.cancel()
                await asyncio.gather(link.d_task, return_exceptions=True)
            if resp is not None:
                resp.release() if clean else resp.close()
            if p_task is not None and not p_task.done():
                if clean:  # the answer is complete: let the prefill finish on its own
                    self._background.add(p_task)
                    p_task.add_done_callback(self._forget)
                else:
                    p_task.cancel()
                    await asyncio.gather(p_task, return_exceptions=True)

    async def _prefill_first(self, prefill: Worker, ep: Endpoint, body: dict) -> bytes:
        """vLLM's dispatch: the prefill computes the prompt and answers one token with kv_transfer_params (its KV
        is held for the decode); the decode's body carries them. Failure if the prefill fails or names no KV."""
        answer = await self._prefill_leg(prefill, ep.path, payload.prefill_first_body(body))
        params = payload.kv_transfer_answer(answer)
        if params is None:
            self.registry.record(prefill, False, "no kv_transfer_params")
            raise Failure.message(502, f"prefill worker {prefill.url} answered without kv_transfer_params "
                                       "(not a prefill server speaking vLLM's protocol?)", "upstream_5xx", True,
                                  (prefill,))
        return orjson.dumps({**body, "kv_transfer_params": params})

    async def _watch_head(self, d_task: asyncio.Task, p_task: asyncio.Task | None, decode: Worker) -> None:
        """Before a migratable stream's first byte: fail the attempt (to be retried on another pair) when its
        (decode) worker is marked unhealthy, or, in PD, sends nothing within the stall timeout of the prefill's
        end (a stopped or wedged decode), instead of waiting for it."""
        down = decode.wait_down()
        try:
            done, _ = await asyncio.wait((d_task, down) if p_task is None else (d_task, p_task, down),
                                         return_when=asyncio.FIRST_COMPLETED)
            if d_task.done():
                return
            stall_s = self.config.stream_stall_timeout_s
            if down not in done and p_task is not None:  # the prefill leg ended first
                if p_task.cancelled() or p_task.exception() is not None:
                    return  # its failure cancels the decode leg (_Link)
                await asyncio.wait((d_task, down), timeout=stall_s, return_when=asyncio.FIRST_COMPLETED)
                if d_task.done():
                    return
            reason = ("was marked unhealthy before its first byte" if down.done() else
                      f"sent nothing within {stall_s:g} s of the prefill's end")
            d_task.cancel()
            await asyncio.gather(d_task, return_exceptions=True)
            self.registry.record(decode, False, f"stalled: {reason}")
            raise Failure.message(504, f"{decode.role} worker {decode.url} {reason}", "stalled", True, (decode,))
        finally:
            down.cancel()

    def _forget(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late prefill failure after a complete answer is not an error

    async def _open(self, w: Worker, path: str, data: bytes) -> Response:
        """POST; the response once its headers arrived. Error statuses raise Failure (body read)."""
        assert self.client is not None
        try:
            resp = await self.client.request(w.url, "POST", path, data)
        except _NET_ERRORS as e:
            self.registry.record(w, False, str(e))
            raise Failure.network(w, e, "to connect") from None
        if resp.status < 400:
            return resp
        try:
            body = await resp.read()
        except _NET_ERRORS:
            body = orjson.dumps(error_body(f"{w.role} worker {w.url} answered {resp.status}", resp.status))
        finally:
            resp.release()
        self.registry.record(w, resp.status < 500, f"answered {resp.status}")
        raise Failure.answered(w, resp.status, body, resp.header("content-type", _JSON))

    async def _head(self, w: Worker, path: str, data: bytes) -> tuple[Response, bytes, bool]:
        """The decode (or only) leg up to the point of no return: (response, body or first SSE chunk, streaming).
        Failures before it (status, connection, an SSE error event as first chunk) raise Failure."""
        resp = await self._open(w, path, data)
        try:
            if resp.content_type != "text/event-stream":
                return resp, await resp.read(), False
            first = await resp.readany()
        except _NET_ERRORS as e:
            resp.close()
            self.registry.record(w, False, str(e))
            raise Failure.network(w, e, "before answering") from None
        except BaseException:
            resp.close()
            raise
        if payload.is_sse_error(first):
            resp.close()
            raise self._event_failure(w, first)
        return resp, first, True

    def _event_failure(self, w: Worker, data: bytes) -> Failure:
        """An SSE error event (`data: {"error": ...}`) as the whole answer."""
        ev = payload.sse_events(data)
        status = payload.sse_error_status(ev[0]) if ev else 500
        self.registry.record(w, status < 500, "error event")
        return Failure(status, ev[0] if ev else data, _JSON, "upstream_5xx" if status >= 500 else "upstream_4xx",
                       status in RETRYABLE_STATUS, (w,))

    async def _prefill_leg(self, w: Worker, path: str, data: bytes) -> bytes:
        """The whole prefill answer; Failure if it failed (status, connection, or an SSE error event)."""
        t0 = time.perf_counter()
        w.inflight += 1
        w.counters.requests.inc()
        resp = None
        try:
            resp = await self._open(w, path, data)
            try:
                body = await resp.read()
            except _NET_ERRORS as e:
                self.registry.record(w, False, str(e))
                raise Failure.network(w, e, "while answering") from None
            if resp.content_type == "text/event-stream":
                for ev in payload.sse_events(body):
                    if payload.is_sse_error(b"data: " + ev):
                        raise self._event_failure(w, b"data: " + ev)
            self.registry.record(w, True)
            return body
        finally:
            w.inflight -= 1
            w.counters.duration.observe(time.perf_counter() - t0)
            if resp is not None:
                resp.close()  # no-op once fully read; else (cancelled) drops the connection: the worker aborts

    # ---- streaming -------------------------------------------------------------------------------------
    async def _relay(self, request: web.Request, w: Worker, resp: Response, first: bytes,
                     merge_with: asyncio.Task | None, link: _Link,
                     mig: _Migration | None = None) -> tuple[web.StreamResponse, bool]:
        """Relay an SSE answer chunk by chunk (the first chunk was awaited before the client got headers, so
        that a failure up to then could still be retried). A migratable stream whose worker fails, stalls or
        sends a server error event continues on another pair (_migrate). Returns (response, whether it ended
        cleanly)."""
        transform: payload.StreamLogprobMerger | payload.StreamTracker | None = None
        if merge_with is not None:
            with contextlib.suppress(Failure):
                transform = payload.StreamLogprobMerger(await merge_with)
        elif mig is not None:
            transform = mig.tracker
        out = mig.out if mig is not None and mig.out is not None else None  # a migrated stream continues it
        stall_s = self.config.stream_stall_timeout_s if mig is not None else None
        try:
            if out is None:
                out = web.StreamResponse(status=resp.status, headers={
                    "Content-Type": resp.header("content-type", "text/event-stream"), **_SSE_HEADERS})
                await out.prepare(request)
                if mig is not None:
                    mig.out = out
            chunk = first
            while chunk:
                data = transform.feed(chunk) if transform is not None else chunk
                if data:
                    await out.write(data)
                if mig is not None and mig.tracker.server_error is not None:  # the worker failed the request
                    error = UpstreamError(f"error event: {mig.tracker.server_error[:300]!r}")
                    return out, await self._broken(request, w, resp, out, link, mig, error)
                try:
                    chunk = await resp.readany(stall_s)
                except _NET_ERRORS as e:
                    return out, await self._broken(request, w, resp, out, link, mig, e)
            tail = transform.flush() if transform is not None else b""
            if tail:
                await out.write(tail)
            self.registry.record(w, True)
            await out.write_eof()
            if mig is not None:
                mig.clean = True
            return out, True
        except ConnectionError:  # the client went away: closing the upstream aborts the request there
            return out, False  # type: ignore[return-value]

    async def _broken(self, request: web.Request, w: Worker, resp: Response, out: web.StreamResponse, link: _Link,
                      mig: _Migration | None, e: BaseException) -> bool:
        """A stream whose upstream broke, stalled or failed after the client got some of it: migrated when it
        may be, else ended with an SSE error event. Whether the client's stream ended cleanly."""
        resp.close()  # a stalled worker sees the disconnect and aborts the request
        if link.p_failure is not None and mig is None:  # the prefill failed after the stream began
            f = link.p_failure
            await out.write(self._sse_error(f"prefill failed: {f.body[:500].decode(errors='replace')}", f.status))
            self.metrics.error("stream", "mid_stream")
            return False
        timed_out = isinstance(e, asyncio.TimeoutError)  # the request's own deadline: not the worker's fault
        reason = ("stalled" if isinstance(e, Stalled) else "timed out" if timed_out else
                  f"failed mid-stream: {type(e).__name__}: {e}".rstrip(": "))
        if not timed_out:
            self.registry.record(w, False, reason)
        if mig is not None and mig.tracker.finished:  # the answer was complete: only its end marker is missing
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            mig.clean = True
            return True
        if mig is not None and mig.count < self.config.migration_limit and not timed_out:
            w.inflight -= 1  # the rest of the stream is another worker's load
            mig.released.append(w)
            return await self._migrate(request, out, mig, w, reason)
        msg = f"{w.role} worker {w.url} {reason}"
        logger.warning("%s", msg)
        await out.write(self._sse_error(msg, 504 if timed_out else 502))
        self.metrics.error("stream", "mid_stream")
        return False

    async def _migrate(self, request: web.Request, out: web.StreamResponse, mig: _Migration, failed: Worker,
                       reason: str) -> bool:
        """Stream migration: re-issue the request with the tokens the client already has (`resume_output_ids`)
        on another pair and continue the same client stream from there, at most --migration-limit times."""
        mig.excluded.append(failed)
        while mig.count < self.config.migration_limit:
            mig.count += 1
            self.metrics.route(mig.ep.kind).migrations.inc()
            logger.warning("%s worker %s %s after %d tokens: migrating the stream (%d of %d)", failed.role,
                           failed.url, reason, len(mig.tracker.ids), mig.count, self.config.migration_limit)
            mig.tracker.restart()
            body = {**mig.body, "resume_output_ids": list(mig.tracker.ids)}
            try:
                prefill, worker = self._pick(mig.text, mig.excluded, mig.tokens)
                await self._attempt(request, mig.ep, orjson.dumps(body), body, prefill, worker, mig)
                return mig.clean
            except Failure as f:
                mig.excluded.extend(f.workers)
                reason = f.reason
                if not f.retryable:  # the continuation itself is refused (e.g. no room left in the context)
                    break
                await asyncio.sleep(self._backoff(mig.count))
        await out.write(self._sse_error(f"the stream failed and {mig.count} migrations did not finish it "
                                        f"(last: {reason})", 502))
        self.metrics.error("stream", "mid_stream")
        return False

    @staticmethod
    def _sse_error(message: str, status: int) -> bytes:
        return b"data: " + orjson.dumps(error_body(message, status)) + b"\n\ndata: [DONE]\n\n"

    # ---- plain calls (info, control) -------------------------------------------------------------------
    async def call(self, w: Worker, method: str, path: str, data: bytes | None = None,
                   timeout: float = 30.0) -> tuple[int, bytes, str]:
        """One request to one worker: (status, body, content type); status 502/504 with an error body when it
        cannot be reached."""
        assert self.client is not None
        try:
            r = await self.client.request(w.url, method, path, data, timeout)
            try:
                return r.status, await r.read(), r.header("content-type", _JSON)
            finally:
                r.release()
        except _NET_ERRORS as e:
            f = Failure.network(w, e, f"on {path}")
            return f.status, f.body, f.content_type
