"""The router's upstream HTTP client (pdserve/router/upstream.py) against a scripted raw TCP server: body framings
(Content-Length, chunked split anywhere, read to close), keep-alive reuse, a stale pooled connection, timeouts
and closing a response early (the server sees the disconnect)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pdserve.router.upstream import UpstreamClient, UpstreamError

Script = Callable[[bytes, int], list[bytes] | None]  # (request, index on the connection) -> pieces to send


class Server:
    """Answers each request with the pieces its script returns (None: close without answering)."""

    def __init__(self, script: Script, close_after: bool = False) -> None:
        self.script, self.close_after = script, close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.disconnected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        i = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                req = head + await reader.readexactly(length)
                self.requests.append(req)
                pieces = self.script(req, i)
                i += 1
                if pieces is None:
                    break
                for p in pieces:
                    writer.write(p)
                    await writer.drain()
                    await asyncio.sleep(0.005)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.disconnected.set()
            writer.close()

    async def __aenter__(self) -> str:
        self.srv = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.srv.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.srv.close()


def fixed(body: bytes, ctype: str = "application/json") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (ctype.encode(), len(body)) + body]


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_content_length_and_keep_alive_reuse():
    async def main() -> None:
        srv = Server(lambda req, i: fixed(b'{"n": %d}' % i))
        async with srv as url:
            c = UpstreamClient(5, 5, {"Authorization": "Bearer k"})
            for i in range(3):
                r = await c.request(url, "POST", "/generate", b'{"x": 1}')
                assert r.status == 200 and r.content_type == "application/json"
                assert await r.read() == b'{"n": %d}' % i
                r.release()
            assert srv.connections == 1
            assert srv.requests[0].startswith(b"POST /generate HTTP/1.1\r\n")
            assert b"Authorization: Bearer k\r\n" in srv.requests[0] and srv.requests[0].endswith(b'{"x": 1}')
            c.close()
    run(main())


def test_chunked_split_anywhere_and_trailers():
    events = [b"data: {\"a\": 1}\n\n", b"data: [DONE]\n\n"]
    raw = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\nX-Trailer: 1\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    whole = head + raw

    async def main() -> None:
        for cut in (1, 3, 7, 40):
            pieces = [whole[i:i + cut] for i in range(0, len(whole), cut)]
            srv = Server(lambda req, i, p=pieces: p)
            async with srv as url:
                c = UpstreamClient(5, 5)
                r = await c.request(url, "POST", "/generate", b"{}")
                assert r.content_type == "text/event-stream"
                assert r.header("content-type") == "text/event-stream; charset=utf-8"
                got = []
                while chunk := await r.readany():
                    got.append(chunk)
                assert b"".join(got) == b"".join(events)
                r.release()
                r2 = await c.request(url, "GET", "/x")  # the connection was reusable
                assert await r2.read() == b"".join(events)
                r2.release()
                assert srv.connections == 1
                c.close()
    run(main())


def test_read_until_close_head_only_and_204():
    async def main() -> None:
        srv = Server(lambda req, i: [b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ", b"world"],
                     close_after=True)
        async with srv as url:
            c = UpstreamClient(5, 5)
            r = await c.request(url, "GET", "/v1/models")
            assert await r.read() == b"hello world" and not r.keep_alive
            r.release()
            c.close()
        srv = Server(lambda req, i: [b"HTTP/1.1 204 No Content\r\n\r\n"])
        async with srv as url:
            c = UpstreamClient(5, 5)
            for _ in range(2):
                r = await c.request(url, "POST", "/flush_cache")
                assert r.status == 204 and await r.read() == b""
                r.release()
            assert srv.connections == 1 and b"Content-Length: 0\r\n" in srv.requests[0]
            c.close()
    run(main())


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one():
    async def main() -> None:
        srv = Server(lambda req, i: fixed(b"ok") if i == 0 else None)  # answers once per connection, then closes
        async with srv as url:
            c = UpstreamClient(5, 5)
            for _ in range(3):
                r = await c.request(url, "POST", "/generate", b"{}")
                assert await r.read() == b"ok"
                r.release()
            assert srv.connections >= 3
            c.close()
        srv = Server(lambda req, i: None)  # never answers: a fresh connection failing is an error
        async with srv as url:
            c = UpstreamClient(5, 5)
            with pytest.raises(UpstreamError):
                await c.request(url, "POST", "/generate", b"{}")
            c.close()
    run(main())


def test_timeout_refused_and_early_close():
    async def main() -> None:
        srv = Server(lambda req, i: [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"] + [b""] * 200)
        async with srv as url:
            c = UpstreamClient(5, 0.2)
            r = await c.request(url, "POST", "/generate", b"{}")
            assert await r.readany() == b"hello"
            with pytest.raises(asyncio.TimeoutError):
                await r.read()
            r.release()
            r = await UpstreamClient(5, 5).request(url, "POST", "/generate", b"{}")
            assert await r.readany() == b"hello"
            srv.disconnected.clear()
            r.close()  # body incomplete: the connection is dropped and the server notices
            await asyncio.wait_for(srv.disconnected.wait(), 5)
            c.close()
        with pytest.raises(OSError):
            await UpstreamClient(5, 5).request(url, "GET", "/health")
    run(main())


def test_cancel_while_waiting_drops_the_connection():
    async def main() -> None:
        srv = Server(lambda req, i: [b""] * 400)  # accepts, never answers (for a while)
        async with srv as url:
            c = UpstreamClient(5, 30)
            t = asyncio.ensure_future(c.request(url, "POST", "/generate", b"{}"))
            await asyncio.sleep(0.1)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            await asyncio.wait_for(srv.disconnected.wait(), 5)
            c.close()
    run(main())
