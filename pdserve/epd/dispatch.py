"""EPD dispatch for a balancer (mini_lb, router) and for language servers started with --encoder-urls.

    result = await dispatch(session, "/generate", body, encoders=["http://enc1", "http://enc2"],
                            target=Target(text="http://text1"))                      # encode + text
    result = await dispatch(session, "/v1/chat/completions", body, encoders=[...],
                            target=Target(prefill="http://p1", bootstrap_port=8998, decode="http://d1"))
    # result.status, result.content_type, and result.body (bytes) or result.stream (async iterator of bytes)

What it does for a request with images (`image_data` of /generate; `image_url` parts of chat messages):
1. Splits the images over the encode servers (contiguous blocks, rotating start), POSTs /encode to each at
   once with a fresh room, and waits: a bad image (400), an encoder error (5xx) or an unreachable encoder
   (502) ends the request here, naming the encoder and the cause, before any language server is involved.
2. Adds `"epd": {"room": R, "images": [{"encoder": control address, "rows": n}, ...]}` to the body and sends
   it to the text server, or (PD) to a prefill and a decode with the usual bootstrap fields. The language
   server pulls the embeddings from the encoders through the transfer engine; the decode only needs the
   row counts (its KV comes from the prefill).
Requests without images go to the target unchanged. aiohttp is the only dependency; the caller owns the
session.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

_JSON = "application/json"
_rotation = itertools.count()


class EncodeFailure(Exception):
    """The encoding step failed: answer `status` with an OpenAI-style error body naming the cause."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def body(self) -> bytes:
        t = "invalid_request_error" if self.status < 500 else "internal_server_error"
        return orjson.dumps({"error": {"message": self.message, "type": t, "param": None, "code": self.status}})


@dataclass(frozen=True)
class Target:
    """The language side: a text server, or a PD pair (prefill with its bootstrap port, decode)."""

    text: str | None = None
    prefill: str | None = None
    bootstrap_port: int | None = None
    decode: str | None = None
    bootstrap_host: str | None = None  # default: the prefill URL's host

    def __post_init__(self) -> None:
        if (self.text is None) == (self.prefill is None or self.decode is None):
            raise ValueError("Target needs text=URL, or prefill=URL and decode=URL")


@dataclass
class DispatchResult:
    status: int
    content_type: str
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None  # streaming answers: relay, then aclose()
    timings: dict[str, float] = field(default_factory=dict)  # encode_s (wall time of step 1)
    encode: dict | None = None  # the epd field that was sent (room, images)


# ---- images in a request ----------------------------------------------------------------------------------
def extract_images(path: str, body: dict) -> list[str]:
    """The request's image sources, in prompt order (empty for text requests)."""
    if path.rstrip("/").endswith("/generate"):
        v = body.get("image_data")
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            return [x for x in v if isinstance(x, str)] if all(isinstance(x, str) for x in v) else \
                [y for x in v if isinstance(x, list) for y in x]
        return []
    out = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if isinstance(url, str):
                        out.append(url)
    return out


def assign_images(num_images: int, num_encoders: int, start: int = 0) -> list[int]:
    """Encoder index of each image: contiguous, near-equal blocks, the first block on encoder `start`."""
    n = min(num_images, num_encoders)
    per, extra = divmod(num_images, n)
    out = []
    for b in range(n):
        out += [(start + b) % num_encoders] * (per + (1 if b < extra else 0))
    return out


def _net_error(url: str, e: BaseException, during: str) -> EncodeFailure:
    if isinstance(e, asyncio.TimeoutError):
        return EncodeFailure(504, f"encode server {url} timed out {during}")
    return EncodeFailure(502, f"encode server {url} is unreachable or failed {during}: {type(e).__name__}: {e}"
                         .rstrip(": "))


async def _post_encode(session: aiohttp.ClientSession, url: str, room: int, images: list[tuple[int, str]],
                       headers: dict | None, timeout: float) -> dict:
    payload = {"room": room, "images": [{"index": i, "url": u} for i, u in images]}
    try:
        async with session.post(f"{url}/encode", data=orjson.dumps(payload), headers={"Content-Type": _JSON,
                                **(headers or {})}, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            raw = await r.read()
            if r.status != 200:
                try:
                    msg = orjson.loads(raw)["error"]["message"]
                except Exception:  # noqa: BLE001 - not our error shape
                    msg = raw[:300].decode(errors="replace")
                status = r.status if r.status < 500 else 502
                raise EncodeFailure(status, f"encode server {url} answered {r.status}: {msg}")
            return orjson.loads(raw)
    except EncodeFailure:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        raise _net_error(url, e, "while encoding") from None


async def encode_images(session: aiohttp.ClientSession, encoders: Sequence[str], images: Sequence[str],
                        headers: dict | None = None, timeout: float = 120.0, room: int | None = None) -> dict:
    """Step 1: encode every image on the encoders; returns the `epd` field for the language servers.
    Raises EncodeFailure (after asking the encoders that succeeded to drop the room)."""
    if not encoders:
        raise EncodeFailure(503, "no encode server configured")
    room = random.getrandbits(63) if room is None else room
    owner = assign_images(len(images), len(encoders), next(_rotation) % len(encoders))
    groups: dict[int, list[tuple[int, str]]] = {}
    for i, (e, src) in enumerate(zip(owner, images)):
        groups.setdefault(e, []).append((i, src))
    urls = [encoders[e].rstrip("/") for e in groups]
    results = await asyncio.gather(*(_post_encode(session, u, room, g, headers, timeout)
                                     for u, g in zip(urls, groups.values())), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        await release(session, [u for u, r in zip(urls, results) if not isinstance(r, BaseException)], room, headers)
        if isinstance(failure, EncodeFailure):
            raise failure
        raise EncodeFailure(502, f"encoding failed: {type(failure).__name__}: {failure}")
    per_image: list[dict | None] = [None] * len(images)
    for r in results:
        for im in r["images"]:
            per_image[im["index"]] = {"encoder": r["encoder"], "rows": im["rows"], "digest": im.get("digest", ""),
                                      "encode_s": im.get("encode_s", 0.0), "nbytes": im.get("nbytes", 0)}
    if any(p is None for p in per_image):
        raise EncodeFailure(502, "an encode server did not return every image it was given")
    return {"room": room, "images": per_image}


async def release(session: aiohttp.ClientSession, encoders: Sequence[str], room: int,
                  headers: dict | None = None) -> None:
    """Best effort: encoders drop what they hold for the room (its request will not fetch it)."""
    async def one(url: str) -> None:
        try:
            async with session.post(f"{url.rstrip('/')}/encode/release", data=orjson.dumps({"room": room}),
                                    headers={"Content-Type": _JSON, **(headers or {})},
                                    timeout=aiohttp.ClientTimeout(total=5)) as r:
                await r.read()
        except Exception:  # noqa: BLE001 - the TTL drops it anyway
            pass

    await asyncio.gather(*(one(u) for u in encoders))


# ---- the whole request -----------------------------------------------------------------------------------
async def dispatch(session: aiohttp.ClientSession, path: str, body: dict, encoders: Sequence[str], target: Target,
                   headers: dict | None = None, timeout: float = 600.0) -> DispatchResult:
    """Run one request through an EPD deployment (see the module docstring). Never raises for upstream
    failures: they come back as a DispatchResult with an error status and body."""
    import time

    images = extract_images(path, body)
    timings: dict[str, float] = {}
    epd = None
    if images:
        t0 = time.perf_counter()
        try:
            epd = await encode_images(session, encoders, images, headers, timeout)
        except EncodeFailure as f:
            return DispatchResult(f.status, _JSON, f.body(), timings=timings)
        timings["encode_s"] = time.perf_counter() - t0
        body = {**body, "epd": epd}
    stream = bool(body.get("stream"))
    if target.text is not None:
        res = await _send(session, target.text, path, body, headers, timeout, stream)
    else:
        res = await _send_pd(session, path, body, target, headers, timeout, stream)
    if epd is not None and res.status != 200:  # the language side failed: encoders drop what is left
        await release(session, list(encoders), epd["room"], headers)
    res.timings.update(timings)
    res.encode = epd
    return res


async def _relay(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    finally:
        resp.release()
        resp.close()


async def _send(session: aiohttp.ClientSession, base: str, path: str, body: dict, headers: dict | None,
                timeout: float, stream: bool) -> DispatchResult:
    url = base.rstrip("/") + path
    try:
        resp = await session.post(url, data=orjson.dumps(body), headers={"Content-Type": _JSON, **(headers or {})},
                                  timeout=aiohttp.ClientTimeout(total=timeout))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        f = EncodeFailure(502, f"language server {base} is unreachable: {type(e).__name__}: {e}".rstrip(": "))
        return DispatchResult(f.status, _JSON, f.body())
    ctype = resp.headers.get("Content-Type", _JSON)
    if stream and resp.status == 200:
        return DispatchResult(200, ctype, stream=_relay(resp))
    try:
        data = await resp.read()
    finally:
        resp.release()
    return DispatchResult(resp.status, ctype, data)


async def _send_pd(session: aiohttp.ClientSession, path: str, body: dict, t: Target, headers: dict | None,
                   timeout: float, stream: bool) -> DispatchResult:
    from urllib.parse import urlparse

    host = t.bootstrap_host or urlparse(t.prefill).hostname
    body = {**body, "bootstrap_host": host, "bootstrap_port": t.bootstrap_port,
            "bootstrap_room": random.getrandbits(63)}
    p_task = asyncio.ensure_future(_send(session, t.prefill, path, {**body, "stream": False}, headers, timeout,
                                         False))
    d_task = asyncio.ensure_future(_send(session, t.decode, path, body, headers, timeout, stream))
    done, _ = await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
    if p_task in done and p_task.result().status != 200:
        d_task.cancel()  # closing the connection aborts the decode's request
        res = await asyncio.gather(d_task, return_exceptions=True)
        if isinstance(res[0], DispatchResult) and res[0].stream is not None:
            await res[0].stream.aclose()
        return p_task.result()
    d = await d_task
    if d.status != 200 or d.stream is None:
        if not p_task.done():
            p_task.cancel()
        await asyncio.gather(p_task, return_exceptions=True)
        return d
    await asyncio.gather(p_task, return_exceptions=True)  # the prefill answers before the decode's first token
    return d
