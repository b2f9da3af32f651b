"""PD deployments for tests: real prefill and decode servers, and a tiny client that acts as the router."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from tests.conftest import ServerProcess, free_port, start_server, stop_server

FAST_HEARTBEAT = {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5", "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2"}
# The PD tests run signed, as `pdserve up` deployments do (unsigned loopback deployments: the EPD tests).
AUTH_TOKEN = "pd-test-secret-0123456789"
SIGNED = {"PDSERVE_DISAGGREGATION_AUTH_TOKEN": AUTH_TOKEN}


@dataclass
class Prefill:
    server: ServerProcess
    bootstrap_port: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def start_prefill(backend: str, extra: list[str] = (), env: dict | None = None, port: int | None = None,
                  bootstrap_port: int | None = None, **where: str) -> Prefill:
    """`where`: host= and netns= for a server in a network namespace (tests/netns_helpers.py)."""
    bp = bootstrap_port or free_port()
    args = ["--num-threads", "1", "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", backend,
            "--disaggregation-bootstrap-port", str(bp), "--max-total-tokens", "8192", *extra]
    env = {**SIGNED, **(env or {})}
    return Prefill(start_server(args, env=env, port=port, **where), bp, args, env)


def start_decode(backend: str, extra: list[str] = (), env: dict | None = None, port: int | None = None,
                 **where: str) -> ServerProcess:
    args = ["--num-threads", "1", "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", backend,
            "--max-total-tokens", "8192", *extra]
    return start_server(args, env={**SIGNED, **FAST_HEARTBEAT, **(env or {})}, port=port, **where)


def pd_pair(backend: str, prefill_extra: list[str] = ()) -> Iterator[tuple[Prefill, ServerProcess]]:
    """A prefill and a decode for a module fixture (`yield from` / iterate): started, yielded, stopped."""
    prefill = start_prefill(backend, prefill_extra)
    try:
        decode = start_decode(backend)
    except Exception:
        stop_all(prefill)
        raise
    yield prefill, decode
    stop_all(prefill, decode)


def with_bootstrap(body: dict, prefill: Prefill, room: int | None = None) -> dict:
    return {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": room if room is not None else random.getrandbits(63)}


def pd_post(prefill: Prefill, decode: ServerProcess, path: str, body: dict, room: int | None = None,
            timeout: float = 120) -> tuple[httpx.Response, httpx.Response]:
    """Send the same body to both servers at once, as a PD router does. Returns (prefill, decode) responses."""
    b = with_bootstrap(body, prefill, room)
    with cf.ThreadPoolExecutor(2) as ex:
        fp = ex.submit(httpx.post, prefill.server.base_url + path, json=b, timeout=timeout)
        fd = ex.submit(httpx.post, decode.base_url + path, json=b, timeout=timeout)
        return fp.result(), fd.result()


def load(server: ServerProcess) -> dict:
    return httpx.get(server.base_url + "/get_load", timeout=30).json()[0]


def flush(server: ServerProcess) -> None:
    httpx.post(server.base_url + "/flush_cache", timeout=30)


def stop_all(*servers) -> None:
    for s in servers:
        stop_server(s.server if isinstance(s, Prefill) else s)


class _CreatesFile:
    """Unpickling this creates the file: what an attacker's frame would do to a pickle decoder."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb(path: str) -> bytes:
    """A pickle whose loading creates `path` (a control port that unpickles runs it)."""
    import pickle

    return pickle.dumps(_CreatesFile(path))


def send_raw_frames(addr: str, frames: list[list[bytes]]) -> None:
    """Push raw multipart frames to a ZMQ control address, as an attacker on the network would."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(addr)
    for parts in frames:
        sock.send_multipart(parts)
    sock.close()


def response_text(path: str, resp: httpx.Response, stream: bool) -> str:
    """The generated text of an OpenAI or /generate answer, streamed (SSE) or not."""
    if not stream:
        body = resp.json()
        if path == "/generate":
            return (body[0] if isinstance(body, list) else body)["text"]  # smg answers a one-item list
        choice = body["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    out = ""
    for line in resp.text.splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if path == "/generate":
            out = chunk["text"]  # cumulative
        elif chunk.get("choices"):
            c = chunk["choices"][0]
            out += (c.get("delta", {}).get("content") or "") if "delta" in c else (c.get("text") or "")
    return out
