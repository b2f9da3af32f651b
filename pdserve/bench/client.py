"""Async streaming client for OpenAI-compatible endpoints: one request in, one RequestRecord with TTFT/ITL out.

TTFT is the time from sending the request to the first SSE chunk that carries text; ITLs are the gaps between
consecutive text-carrying chunks (a chunk with several tokens counts as one gap, as in SGLang's
bench_serving). Token counts come from the server's `usage` (stream_options.include_usage); a server that
sends none gets the number of text chunks as output length and the dataset's estimate as prompt length.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

from pdserve.bench.config import BenchConfig
from pdserve.bench.datasets import RequestSpec

READ_BUFSIZE = 4 * 1024 * 1024
_ERROR_BODY_CHARS = 500


@dataclass
class RequestRecord:
    """One measured request. Times in seconds; `start_time` is relative to the run's start."""

    index: int
    kind: str
    prompt_len: int
    expected_output_len: int
    group: int | None = None
    start_time: float = 0.0
    output_len: int = 0
    cached_len: int = 0  # prompt tokens the server had cached (usage.prompt_tokens_details.cached_tokens)
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    success: bool = False
    error: str = ""
    usage_reported: bool = False
    finish_reason: str | None = None
    done: bool = False  # the client finished with it (success or not)

    @classmethod
    def for_spec(cls, spec: RequestSpec) -> RequestRecord:
        return cls(index=spec.index, kind=spec.kind, prompt_len=spec.prompt_len,
                   expected_output_len=spec.output_len, group=spec.group)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if not self.success or self.ttft is None or self.e2e is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)

    def token_times(self) -> list[float]:
        """Arrival times (since the run's start) of the text chunks: first token, then each ITL gap's end."""
        if self.ttft is None:
            return []
        t = self.start_time + self.ttft
        out = [t]
        for gap in self.itl:
            t += gap
            out.append(t)
        return out

    def fail(self, error: str) -> None:
        if not self.done:
            self.success, self.error, self.done = False, error, True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("done")
        d["tpot"] = self.tpot
        return d


class BenchError(Exception):
    """The run cannot go on (server unreachable, no model, warmup failed); the CLI prints it and exits 1."""


def auth_headers(cfg: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def new_session() -> aiohttp.ClientSession:
    """No connection cap (the load shape is ours to decide) and no session timeout (each request has one)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None), read_bufsize=READ_BUFSIZE)


async def fetch_model(session: aiohttp.ClientSession, cfg: BenchConfig) -> str:
    url = cfg.base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=auth_headers(cfg), timeout=aiohttp.ClientTimeout(total=30)) as r:
            body = await r.read()
            if r.status != 200:
                raise BenchError(f"GET {url} answered {r.status}: {body[:_ERROR_BODY_CHARS].decode(errors='replace')}")
            data = orjson.loads(body).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, AttributeError) as e:
        raise BenchError(f"cannot list models at {url}: {type(e).__name__}: {e}") from None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise BenchError(f"GET {url} lists no model; pass --model")
    return str(data[0]["id"])


def build_payload(cfg: BenchConfig, model: str, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "max_tokens": spec.output_len, "temperature": cfg.temperature, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.is_chat:
        messages = [{"role": "system", "content": spec.system}] if spec.system else []
        body["messages"] = [*messages, {"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = f"{spec.system}\n\n{spec.prompt}" if spec.system else spec.prompt
    body.update(cfg.extra_request_body)
    return body


def _chunk_text(data: dict[str, Any], chat: bool) -> tuple[str, str | None]:
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return "", None
    c = choices[0]
    if chat:
        delta = c.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    else:
        text = c.get("text") or ""
    return text, c.get("finish_reason")


def _error_text(data: Any) -> str:
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err if err is not None else data)[:_ERROR_BODY_CHARS]


async def _stream(session: aiohttp.ClientSession, cfg: BenchConfig, payload: dict[str, Any],
                  rec: RequestRecord, t0: float) -> None:
    st = time.perf_counter()
    rec.start_time = st - t0
    last = st
    chunks = 0
    saw_done = False
    async with session.post(cfg.url, json=payload, headers=auth_headers(cfg)) as resp:
        if resp.status != 200:
            body = (await resp.read())[:_ERROR_BODY_CHARS * 4]
            try:
                msg = _error_text(orjson.loads(body))
            except orjson.JSONDecodeError:
                msg = body.decode(errors="replace")[:_ERROR_BODY_CHARS]
            rec.fail(f"HTTP {resp.status}: {msg}")
            return
        buf = b""
        async for piece in resp.content.iter_any():
            now = time.perf_counter()
            buf += piece
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                data_bytes = line[5:].strip()
                if data_bytes == b"[DONE]":
                    saw_done = True
                    continue
                try:
                    data = orjson.loads(data_bytes)
                except orjson.JSONDecodeError:
                    rec.fail(f"malformed SSE data: {data_bytes[:200].decode(errors='replace')}")
                    return
                if not isinstance(data, dict):
                    continue
                if "error" in data and not data.get("choices"):
                    rec.fail(f"stream error: {_error_text(data)}")
                    return
                usage = data.get("usage")
                if isinstance(usage, dict):
                    rec.usage_reported = True
                    rec.output_len = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens") is not None:
                        rec.prompt_len = int(usage["prompt_tokens"])
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                        rec.cached_len = details["cached_tokens"]
                text, finish = _chunk_text(data, cfg.is_chat)
                if finish is not None:
                    rec.finish_reason = finish
                if text:
                    if rec.ttft is None:
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
        end = time.perf_counter()
    rec.e2e = end - st
    if not saw_done and rec.finish_reason is None:
        rec.fail("the stream ended without a finish_reason or [DONE]")
        return
    if not rec.usage_reported:
        rec.output_len = chunks
    rec.success, rec.done = True, True


async def send_request(session: aiohttp.ClientSession, cfg: BenchConfig, model: str, spec: RequestSpec,
                       rec: RequestRecord, t0: float) -> RequestRecord:
    """Send `spec`, filling `rec` as it streams. Never raises except CancelledError (after marking `rec`)."""
    payload = build_payload(cfg, model, spec)
    try:
        await asyncio.wait_for(_stream(session, cfg, payload, rec, t0), timeout=cfg.timeout)
    except asyncio.TimeoutError:
        rec.fail(f"timeout: no complete answer within {cfg.timeout:g} s")
    except asyncio.CancelledError:
        rec.fail("cancelled: --duration-limit reached")
        raise
    except (aiohttp.ClientError, OSError, ValueError) as e:
        rec.fail(f"{type(e).__name__}: {e}")
    if rec.e2e is None and rec.done:
        rec.e2e = time.perf_counter() - t0 - rec.start_time
    return rec
