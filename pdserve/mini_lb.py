"""Minimal PD load balancer for debugging (SGLang's mini_lb): a random prefill/decode pair per request, the same
body with bootstrap fields sent to both at once, the decode's answer relayed (streams chunk by chunk). No health
checks, retries or policies: `python -m pdserve.launch_router` has those. With `--encode`, image requests go
through the EPD dispatch (pdserve/epd/dispatch.py): encode first, then a text server or a PD pair.

    python -m pdserve.mini_lb --prefill http://127.0.0.1:30001 --decode http://127.0.0.1:30002 \
        --prefill-bootstrap-ports 8998 --host 127.0.0.1 --port 8000
    python -m pdserve.mini_lb --encode URL... --text URL...
    python -m pdserve.mini_lb --encode URL... --prefill URL... --decode URL...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

JSON = {"Content-Type": "application/json"}


def _error(message: str, status: int) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "internal_server_error",
                      "param": None, "code": status}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class MiniLoadBalancer:
    def __init__(self, prefills: list[tuple[str, int | None]], decodes: list[str], encoders: list[str] = (),
                 texts: list[str] = ()) -> None:
        self.prefills, self.decodes = prefills, decodes
        self.encoders, self.texts = list(encoders), list(texts)
        self.session: aiohttp.ClientSession | None = None

    async def start(self, _: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600))

    async def stop(self, _: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def generate(self, request: web.Request, path: str) -> web.StreamResponse:
        assert self.session is not None
        try:
            body = orjson.loads(await request.read())
            assert isinstance(body, dict)
        except (orjson.JSONDecodeError, AssertionError):
            return _error("request body must be a JSON object", 400)
        if self.encoders and path in ("/generate", "/v1/chat/completions"):
            return await self._epd(request, path, body)
        if not self.prefills:  # text servers only: a plain forward
            return await self._epd(request, path, body)
        (p_url, port), d_url = random.choice(self.prefills), random.choice(self.decodes)
        host = urlsplit(p_url).hostname or ""
        host = f"[{host}]" if ":" in host else host
        items = body.get("text", body.get("input_ids"))
        batch = path == "/generate" and isinstance(items, list) and bool(items) and not isinstance(items[0], int)
        n = len(items) if batch else None
        if n is None:
            body.update(bootstrap_host=host, bootstrap_port=port, bootstrap_room=random.getrandbits(63))
        else:  # a batch: one room per prompt
            body.update(bootstrap_host=[host] * n, bootstrap_port=[port] * n,
                        bootstrap_room=[random.getrandbits(63) for _ in range(n)])
        data = orjson.dumps(body)
        prefill = asyncio.ensure_future(self._read(p_url + path, data))
        try:
            resp = await self.session.post(d_url + path, data=data, headers=JSON)
        except aiohttp.ClientError as e:
            prefill.cancel()
            return _error(f"decode {d_url} unreachable: {e}", 502)
        try:
            if resp.content_type == "text/event-stream":
                out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream"})
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            answer = await resp.read()
            if body.get("return_logprob") and resp.status == 200 and path == "/generate":
                p_answer = (await asyncio.gather(prefill, return_exceptions=True))[0]
                if isinstance(p_answer, bytes):
                    answer = self._merge(p_answer, answer)
            return web.Response(body=answer, status=resp.status, content_type=resp.content_type)
        finally:
            resp.close()
            await asyncio.gather(prefill, return_exceptions=True)

    async def _epd(self, request: web.Request, path: str, body: dict) -> web.StreamResponse:
        from pdserve.epd.dispatch import Target, dispatch

        if self.texts:
            target = Target(text=random.choice(self.texts))
        else:
            (p_url, port), d_url = random.choice(self.prefills), random.choice(self.decodes)
            target = Target(prefill=p_url, bootstrap_port=port, decode=d_url)
        res = await dispatch(self.session, path, body, self.encoders, target)
        if res.stream is None:
            return web.Response(body=res.body, status=res.status, headers={"Content-Type": res.content_type})
        out = web.StreamResponse(status=res.status, headers={"Content-Type": res.content_type})
        await out.prepare(request)
        async with contextlib.aclosing(res.stream) as chunks:
            async for c in chunks:
                await out.write(c)
        await out.write_eof()
        return out

    async def _read(self, url: str, data: bytes) -> bytes:
        assert self.session is not None
        async with self.session.post(url, data=data, headers=JSON) as r:
            return await r.read()

    @staticmethod
    def _merge(prefill: bytes, decode: bytes) -> bytes:
        """Prepend the prefill's input logprobs, as SGLang's mini_lb does."""
        try:
            p, d = orjson.loads(prefill), orjson.loads(decode)
        except orjson.JSONDecodeError:
            return decode
        for pi, di in zip(p if isinstance(p, list) else [p], d if isinstance(d, list) else [d]):
            try:
                di["meta_info"]["input_token_logprobs"] = (pi["meta_info"]["input_token_logprobs"]
                                                           + (di["meta_info"].get("input_token_logprobs") or []))
            except (KeyError, TypeError):
                pass
        return orjson.dumps(d)

    async def forward_get(self, url: str) -> web.Response:
        assert self.session is not None
        try:
            async with self.session.get(url) as r:
                return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)
        except aiohttp.ClientError as e:
            return _error(f"{url} unreachable: {e}", 502)

    async def server_info(self, _: web.Request) -> web.Response:
        assert self.session is not None

        async def info(url: str) -> object:
            try:
                async with self.session.get(url + "/get_server_info") as r:  # type: ignore[union-attr]
                    return orjson.loads(await r.read())
            except (aiohttp.ClientError, orjson.JSONDecodeError) as e:
                return {"url": url, "error": str(e)}

        p = await asyncio.gather(*(info(u) for u, _ in self.prefills))
        d = await asyncio.gather(*(info(u) for u in self.decodes))
        states = [s for info in d if isinstance(info, dict) for s in info.get("internal_states") or []]
        return web.Response(body=orjson.dumps({"prefill": p, "decode": d, "internal_states": states}),
                            content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, lambda r, p=path: self.generate(r, p))
        app.router.add_get("/health", lambda _: web.Response(status=200))
        lang = self.decodes[0] if self.decodes else self.texts[0]
        app.router.add_get("/v1/models", lambda _: self.forward_get(lang + "/v1/models"))
        app.router.add_get("/get_model_info", lambda _: self.forward_get(
            (self.prefills[0][0] if self.prefills else lang) + "/get_model_info"))
        app.router.add_get("/get_server_info", self.server_info)
        return app


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # a faster event loop (requirements.txt); asyncio's own without it
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.mini_lb", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", nargs="+", default=[], metavar="URL")
    ap.add_argument("--decode", nargs="+", default=[], metavar="URL")
    ap.add_argument("--encode", nargs="+", default=[], metavar="URL", help="EPD: encode servers")
    ap.add_argument("--text", nargs="+", default=[], metavar="URL", help="EPD: language-only servers (PD not split)")
    ap.add_argument("--prefill-bootstrap-ports", nargs="+", default=None, metavar="PORT",
                    help="one per prefill (or one for all); a number or 'none'; default 8998")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    if not args.text and not (args.prefill and args.decode):
        ap.error("give --prefill and --decode, or --text (with --encode)")
    if args.text and not args.encode:
        ap.error("--text needs --encode")
    ports = args.prefill_bootstrap_ports or ["8998"]
    if len(ports) == 1:
        ports = ports * len(args.prefill)
    if args.prefill and len(ports) != len(args.prefill):
        ap.error(f"{len(ports)} bootstrap ports for {len(args.prefill)} prefill servers")
    try:
        parsed = [None if p.lower() == "none" else int(p) for p in ports]
    except ValueError:
        ap.error(f"bootstrap ports must be numbers or 'none', got {ports}")
    lb = MiniLoadBalancer([(u.rstrip("/"), p) for u, p in zip(args.prefill, parsed)],
                          [u.rstrip("/") for u in args.decode], [u.rstrip("/") for u in args.encode],
                          [u.rstrip("/") for u in args.text])
    web.run_app(lb.app(), host=args.host, port=args.port, access_log=None, loop=_event_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
