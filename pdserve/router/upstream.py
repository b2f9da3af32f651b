"""A small HTTP/1.1 client for the router's requests to workers: keep-alive connection pools per worker, one
write per request, no per-request objects beyond the response. aiohttp's client costs ~5x the CPU per request
(profiled), and the router sends two upstream requests per PD request.

Only what the router needs: Content-Length, chunked and read-until-close bodies, http and https, a connect
timeout, a total timeout per request, read flow control, and one transparent retry when a reused keep-alive
connection turns out closed before any answer byte (the server closed it while idle). Closing a response whose
body was not read to the end closes its connection: the worker sees the disconnect and aborts the request."""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_mod
import time
from urllib.parse import urlsplit

# Parser states of a connection reading an answer.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _TO_EOF = range(8)
_MAX_HEAD = 1 << 16  # status line + headers
_HIGH_WATER = 1 << 22  # unread body bytes before the socket is paused
_IDLE_S = 15.0  # below the workers' own keep-alive (30 s), so that idle connections are ours to close
_MAX_IDLE = 256  # idle connections kept per worker
_STALE_S = 0.5  # a reused connection closed this soon after sending, without an answer byte, is retried once


class UpstreamError(Exception):
    """The connection broke or the answer is not valid HTTP."""


class Stalled(UpstreamError):
    """Nothing arrived for the idle timeout given to readany() (the answer stays open)."""


class _Stale(UpstreamError):
    """Closed right after the request was sent, before any byte of the answer arrived."""


def _field(head: bytes, low: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case) in an answer head (`low`: the head in lower case)."""
    i = low.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    i += len(name) + 3
    j = low.find(b"\r\n", i)
    return head[i:j if j >= 0 else len(head)].strip()


class Response:
    """Status and headers of an answer; its body through read() / readany()."""

    __slots__ = ("status", "keep_alive", "_head", "_low", "_conn", "_chunks", "_size", "_eof", "_exc", "_waiter",
                 "_timer", "_done")

    def __init__(self, conn: _Conn, status: int, head: bytes, low: bytes, keep_alive: bool) -> None:
        self.status, self.keep_alive, self._conn = status, keep_alive, conn
        self._head, self._low = head, low
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False  # released or closed

    def header(self, name: str, default: str | None = None) -> str | None:
        """A header's value (the first one if repeated); `name` in lower case."""
        v = _field(self._head, self._low, name.encode())
        return default if v is None else v.decode("latin-1")

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters (as aiohttp's ClientResponse.content_type)."""
        v = _field(self._head, self._low, b"content-type")
        return v.split(b";", 1)[0].strip().lower().decode("latin-1") if v else "application/octet-stream"

    async def readany(self, idle_timeout: float | None = None) -> bytes:
        """The body bytes that arrived since the last call (waits for some); b"" at the end. With idle_timeout,
        Stalled when nothing arrives for that long (the response stays open)."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            waiter = self._waiter = self._conn.loop.create_future()
            stall = None
            if idle_timeout is not None:
                stall = self._conn.loop.call_later(
                    idle_timeout, lambda: waiter.done() or waiter.set_exception(
                        Stalled(f"nothing arrived for {idle_timeout:g} s")))
            try:
                await waiter
            finally:
                self._waiter = None
                if stall is not None:
                    stall.cancel()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._size >= _HIGH_WATER:
            self._conn.resume()
        self._size = 0
        return data

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = []
        while True:
            data = await self.readany()
            if not data:
                return b"".join(parts) if len(parts) != 1 else parts[0]
            parts.append(data)

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the whole body arrived; else it is closed (the
        worker sees the disconnect) and a pending readany() raises."""
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        if self._eof and self._exc is None and self.keep_alive:
            self._conn.reuse()
        else:
            self._conn.close()
            self._fail(UpstreamError("connection closed by the router"))

    close = release  # as aiohttp's: a no-op for the connection once the body is complete

    # ---- fed by the connection ---------------------------------------------------------------------------
    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._eof = True
        self._cancel_timer()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._eof or self._exc is not None:
            return
        self._exc = exc
        self._wake()


class _Conn(asyncio.Protocol):
    """One connection; one request at a time. Parses the answer's head and de-frames its body."""

    def __init__(self, pool: _Pool) -> None:
        self.pool, self.loop = pool, pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._sent_at = 0.0
        self._paused = False
        self._head_waiter: asyncio.Future | None = None
        self._resp: Response | None = None
        self._buf = b""
        self._mode = _IDLE
        self._left = 0
        self._no_body = False
        self._got_bytes = False

    # ---- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._head_waiter is not None and not self._head_waiter.done():
            stale = not self._got_bytes and self.loop.time() - self._sent_at < _STALE_S
            err = _Stale if stale else UpstreamError
            self._head_waiter.set_exception(err(f"server disconnected{f': {exc}' if exc else ''}"))
        r = self._resp
        if r is not None:
            if self._mode == _TO_EOF and exc is None:
                r._finish()
            else:
                r._fail(UpstreamError(f"server disconnected before the answer was complete"
                                      f"{f': {exc}' if exc else ''}"))

    def eof_received(self) -> bool:
        return False  # close

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parse(data)
        except (ValueError, UnicodeDecodeError) as e:
            self._abort(UpstreamError(f"invalid HTTP answer: {e}"))

    # ---- requests ----------------------------------------------------------------------------------------
    async def exchange(self, data: bytes, head_only: bool, timeout: float) -> Response:
        """Sends `data` (a whole request) and waits for the answer's head."""
        assert self.transport is not None
        self._sent_at = self.loop.time()
        self._mode, self._buf, self._no_body, self._got_bytes = _HEAD, b"", head_only, False
        self._resp = None
        fut = self._head_waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._timed_out)
        self.transport.write(data)
        try:
            resp = await fut
        except BaseException:
            timer.cancel()
            self.close()
            raise
        finally:
            self._head_waiter = None
        resp._timer = timer
        if resp._eof:
            resp._cancel_timer()
        return resp

    def _timed_out(self) -> None:
        self._abort(asyncio.TimeoutError())

    def _abort(self, exc: BaseException) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
        if self._resp is not None:
            self._resp._fail(exc)
        self.close()

    def reuse(self) -> None:
        self._resp = None
        if self._mode != _IDLE or self.closed or self._buf:
            self.close()  # extra bytes after the answer: not a connection to reuse
        else:
            self.pool.put(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # ---- parsing -----------------------------------------------------------------------------------------
    def _feed_body(self, buf: bytes) -> bytes:
        """Hand up to `_left` body bytes of buf to the response; the rest of buf."""
        take = buf[:self._left]
        self._left -= len(take)
        self._resp._feed(take)  # type: ignore[union-attr]
        return buf[len(take):]

    def _parse(self, data: bytes) -> None:
        mode = self._mode
        if mode == _LENGTH:  # the common case first: a Content-Length body
            n = len(data)
            if n <= self._left:
                self._left -= n
                self._resp._feed(data)  # type: ignore[union-attr]
                if self._left == 0:
                    self._end()
                return
            self._resp._feed(data[:self._left])  # type: ignore[union-attr]
            self._buf, self._left = data[self._left:], 0
            self._end()
            return
        if mode == _TO_EOF:
            self._resp._feed(data)  # type: ignore[union-attr]
            return
        if mode == _IDLE:
            self._buf += data  # unsolicited bytes: the connection will not be reused
            return
        buf = self._buf + data if self._buf else data
        self._buf = b""
        while buf:
            mode = self._mode
            if mode == _HEAD:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > _MAX_HEAD:
                        raise ValueError("answer head too large")
                    break
                head, buf = buf[:i], buf[i + 4:]
                self._on_head(head)
            elif mode == _LENGTH:
                buf = self._feed_body(buf)
                if self._left == 0:
                    self._end()
            elif mode == _CHUNK_SIZE:
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long")
                    break
                size = int(buf[:i].split(b";", 1)[0].strip(), 16)
                buf = buf[i + 2:]
                self._mode, self._left = (_CHUNK_DATA, size) if size else (_TRAILERS, 0)
            elif mode == _CHUNK_DATA:
                buf = self._feed_body(buf)
                if self._left == 0:
                    self._mode = _CHUNK_CRLF
            elif mode == _CHUNK_CRLF:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError("missing CRLF after a chunk")
                buf, self._mode = buf[2:], _CHUNK_SIZE
            elif mode == _TRAILERS:  # trailers (ignored) up to an empty line
                if buf.startswith(b"\r\n"):
                    buf = buf[2:]
                    self._end()
                    continue
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                buf = buf[i + 4:]
                self._end()
            elif mode == _TO_EOF:
                self._resp._feed(buf)  # type: ignore[union-attr]
                buf = b""
            else:  # 0: bytes after the answer
                break
        self._buf = buf

    def _on_head(self, head: bytes) -> None:
        if not head.startswith(b"HTTP/1.") or head[8:9] != b" ":
            raise ValueError(f"bad status line {head[:100]!r}")
        status = int(head[9:12])
        if 100 <= status < 200:
            return  # informational: the real head follows
        low = head.lower()
        keep_alive = head[5:8] == b"1.1" and b"close" not in (_field(low, low, b"connection") or b"")
        resp = self._resp = Response(self, status, head, low, keep_alive)
        length = _field(head, low, b"content-length")
        if self._no_body or status in (204, 304):
            self._end()
        elif b"chunked" in (_field(low, low, b"transfer-encoding") or b""):
            self._mode = _CHUNK_SIZE
        elif length is not None:
            self._left = int(length)
            if self._left < 0:
                raise ValueError("negative Content-Length")
            self._mode = _LENGTH
            if self._left == 0:
                self._end()
        else:
            self._mode, resp.keep_alive = _TO_EOF, False
        w = self._head_waiter
        if w is not None and not w.done():
            w.set_result(resp)

    def _end(self) -> None:
        self._mode = _IDLE
        if self._resp is not None:
            self._resp._finish()


class _Pool:
    """Idle keep-alive connections to one worker (last in, first out)."""

    def __init__(self, base_url: str, loop: asyncio.AbstractEventLoop, connect_timeout: float) -> None:
        u = urlsplit(base_url)
        self.loop, self.connect_timeout = loop, connect_timeout
        self.host = u.hostname or ""
        self.https = u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        default = (443 if self.https else 80) == self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default else f"{host}:{self.port}").encode("idna")
        self.idle: list[_Conn] = []
        self._ssl: ssl_mod.SSLContext | None = None

    async def connect(self) -> _Conn:
        if self.https and self._ssl is None:
            self._ssl = ssl_mod.create_default_context()
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self._ssl),
            self.connect_timeout)
        return conn  # type: ignore[return-value]

    def get(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            c = self.idle.pop()
            if not c.closed and now - c.idle_since < _IDLE_S and c.transport and not c.transport.is_closing():
                return c
            c.close()
        return None

    def put(self, c: _Conn) -> None:
        if len(self.idle) >= _MAX_IDLE:
            c.close()
            return
        c.idle_since = time.monotonic()
        self.idle.append(c)

    def forget(self, c: _Conn) -> None:
        if self.idle and c in self.idle:
            self.idle.remove(c)

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


class UpstreamClient:
    """request(base_url, ...) -> Response; raises OSError (connect), asyncio.TimeoutError or UpstreamError."""

    def __init__(self, connect_timeout: float, request_timeout: float,
                 headers: dict[str, str] | None = None) -> None:
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self._extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in (headers or {}).items())
        self._pools: dict[str, _Pool] = {}

    def _pool(self, base_url: str) -> _Pool:
        p = self._pools.get(base_url)
        if p is None:
            p = self._pools[base_url] = _Pool(base_url, asyncio.get_running_loop(), self.connect_timeout)
        return p

    async def request(self, base_url: str, method: str, path: str, body: bytes | None = None,
                      timeout: float | None = None) -> Response:
        """Sends the request (JSON content type, the client's headers) and returns once the answer's head
        arrived; release() or close() the response when done."""
        pool = self._pool(base_url)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s" % (
            method.encode(), path.encode(), pool.host_header, self._extra)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % len(body or b"")
        data = head + b"\r\n" + body if body else head + b"\r\n"
        timeout = self.request_timeout if timeout is None else timeout
        head_only = method == "HEAD"
        conn = pool.get()
        if conn is not None:
            try:
                return await conn.exchange(data, head_only, timeout)
            except _Stale:
                pass  # the worker closed the idle connection as we sent: once more on a fresh one
        conn = await pool.connect()
        try:
            return await conn.exchange(data, head_only, timeout)
        except _Stale as e:
            raise UpstreamError(str(e)) from None

    def forget(self, base_url: str) -> None:
        p = self._pools.pop(base_url, None)
        if p is not None:
            p.close()

    def close(self) -> None:
        for p in self._pools.values():
            p.close()
        self._pools.clear()
