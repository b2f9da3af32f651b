"""Graceful drain: SIGTERM or POST /drain on a server (or the router) refuses new requests with 503 and turns
/health 503, lets the requests in flight finish, then exits 0. A rolling restart of every server of a 2P+2D
deployment, one at a time, under load, loses no request and changes no output."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import httpx

from tests.conftest import ServerProcess, spawn, start_server, wait_ok
from tests.pd_helpers import Prefill, start_decode, start_prefill, stop_all
from tests.test_router import router

BACKEND = os.environ.get("PDSERVE_TEST_FAILURE_BACKEND", "nixl")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,", "Once upon a time"]


def _greedy(prompt: str, n: int = 16) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}}


def _stream_tokens(url: str, body: dict, first: threading.Event) -> tuple[int, list[int], dict]:
    """A streamed /generate: (status, output ids, last chunk's meta_info); sets `first` at the first chunk."""
    ids: list[int] = []
    meta: dict = {}
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=180) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            ids, meta = chunk.get("output_ids", ids), chunk.get("meta_info", meta)
            first.set()
        return resp.status_code, ids, meta


def _exit_code(server: ServerProcess, timeout: float) -> int:
    try:
        return server.proc.wait(timeout=timeout)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)


def test_sigterm_drains_a_server_then_it_exits():
    """SIGTERM to the server's process group (what `pdserve up`, Kubernetes and systemd send) while a stream
    runs: the stream finishes in full, new requests get a 503 naming the drain, then the server exits 0."""
    server = start_server(["--num-threads", "1", "--max-total-tokens", "4096"])
    body = {"text": "Tell me a story.", "sampling_params": {"max_new_tokens": 48, "ignore_eos": True}}
    first = threading.Event()
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(_stream_tokens, server.base_url, body, first)
        assert first.wait(120)
        os.killpg(server.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(server.base_url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503"
            time.sleep(0.05)
        refused = httpx.post(server.base_url + "/generate", json=_greedy("hi", 2), timeout=30)
        assert refused.status_code == 503 and "draining" in refused.json()["error"]["message"], refused.text
        status, ids, meta = fut.result(timeout=180)
    assert status == 200 and len(ids) == 48 and meta["finish_reason"]["type"] == "length"
    assert _exit_code(server, 60) == 0, server.log()[-3000:]
    assert "drained" in server.log()


def test_post_drain_on_a_prefill_keeps_kv_until_the_decode_has_it():
    """POST /drain on a prefill while it computes a long prompt: that request still completes through the
    decode with its whole output; the prefill refuses new work, then exits 0; the decode stays healthy."""
    prefill = start_prefill(BACKEND)
    decode = start_decode(BACKEND)
    try:
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 120  # ~1.2k tokens: about a second
        ref_args = ["--pd-disaggregation", "--prefill", prefill.server.base_url, str(prefill.bootstrap_port),
                    "--decode", decode.base_url, "--disable-decode-fallback"]
        with router(ref_args) as r, cf.ThreadPoolExecutor(1) as ex:
            ref = httpx.post(r.base_url + "/generate", json=_greedy(long_prompt), timeout=120).json()["output_ids"]
            httpx.post(prefill.server.base_url + "/flush_cache", timeout=30)  # the next one computes the prompt again
            fut = ex.submit(httpx.post, r.base_url + "/generate", json=_greedy(long_prompt), timeout=180)
            time.sleep(0.3)  # the prefill has it now
            drained = httpx.post(prefill.server.base_url + "/drain", timeout=30).json()
            assert drained["draining"] is True
            resp = fut.result(timeout=180)
            assert resp.status_code == 200, resp.text
            assert resp.json()["output_ids"] == ref
        assert _exit_code(prefill.server, 60) == 0, prefill.server.log()[-3000:]
        assert httpx.get(decode.base_url + "/health", timeout=10).status_code == 200
        assert httpx.get(decode.base_url + "/get_load", timeout=10).json()[0]["num_reqs"] == 0
    finally:
        stop_all(prefill, decode)


def test_rolling_restart_of_2p2d_under_load_loses_nothing():
    with cf.ThreadPoolExecutor(4) as ex:
        prefills: list[Prefill] = list(ex.map(lambda _: start_prefill(BACKEND), range(2)))
        decodes: list[ServerProcess] = list(ex.map(lambda _: start_decode(BACKEND), range(2)))
    args = ["--pd-disaggregation", "--policy", "round_robin", "--health-check-interval-secs", "0.3",
            "--health-failure-threshold", "1", "--health-success-threshold", "1", "--retry-initial-backoff-ms", "20"]
    for p in prefills:
        args += ["--prefill", p.server.base_url, str(p.bootstrap_port)]
    for d in decodes:
        args += ["--decode", d.base_url]
    try:
        with router(args) as r:
            ref = {p: httpx.post(r.base_url + "/generate", json=_greedy(p), timeout=120).json()["output_ids"]
                   for p in PROMPTS}
            stop = threading.Event()
            results: list[tuple[str, int, list[int] | str]] = []

            def client(i: int) -> None:
                k = i
                while not stop.is_set():
                    prompt = PROMPTS[k % len(PROMPTS)]
                    k += 1
                    resp = httpx.post(r.base_url + "/generate", json=_greedy(prompt), timeout=180)
                    results.append((prompt, resp.status_code,
                                    resp.json()["output_ids"] if resp.status_code == 200 else resp.text))

            def healthy_in_router(url: str) -> bool:
                workers = httpx.get(r.base_url + "/workers", timeout=10).json()["workers"]
                return any(w["url"] == url and w["healthy"] for w in workers)

            with cf.ThreadPoolExecutor(3) as load:
                clients = [load.submit(client, i) for i in range(3)]
                restarts = []
                for role, index in (("prefill", 0), ("decode", 0), ("prefill", 1), ("decode", 1)):
                    old = prefills[index].server if role == "prefill" else decodes[index]
                    port = int(old.base_url.rsplit(":", 1)[1])
                    n_before = len(results)
                    t0 = time.monotonic()
                    os.killpg(old.proc.pid, signal.SIGTERM)
                    assert _exit_code(old, 120) == 0, old.log()[-3000:]
                    if role == "prefill":
                        prefills[index] = start_prefill(BACKEND, port=port,
                                                        bootstrap_port=prefills[index].bootstrap_port)
                    else:
                        decodes[index] = start_decode(BACKEND, port=port)
                    deadline = time.monotonic() + 60
                    while not healthy_in_router(old.base_url):
                        assert time.monotonic() < deadline, f"{role} {index} did not rejoin the router"
                        time.sleep(0.1)
                    restarts.append((role, index, time.monotonic() - t0, len(results) - n_before))
                    time.sleep(1.0)  # traffic through the new server before the next one goes
                stop.set()
                for c in clients:
                    c.result(timeout=240)
            retries = sum(float(line.split()[-1]) for line in httpx.get(r.base_url + "/metrics", timeout=10).text
                          .splitlines() if line.startswith("pdserve_router_retries_total"))
        print(f"\nrolling restart: {len(results)} requests, {retries:.0f} router retries; "
              + "; ".join(f"{role} {i} out and back in {dt:.1f} s ({n} requests meanwhile)"
                          for role, i, dt, n in restarts))
        failed = [(p, s, out) for p, s, out in results if s != 200]
        assert not failed, failed[:3]
        assert all(out == ref[p] for p, _, out in results)
        assert len(results) >= 20
    finally:
        stop_all(*prefills, *decodes)


def test_router_drain(server):
    """POST /drain on the router: readiness 503, new requests 503, an open stream finishes, then it exits 0."""
    r = wait_ok(spawn("pdserve.launch_router", ["--worker-urls", server.base_url], log_prefix="pdserve-router-"),
                "/readiness", 60, "router", interval_s=0.2)
    try:
        body = {"text": "Tell me a story.", "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}
        first = threading.Event()
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(_stream_tokens, r.base_url, body, first)
            assert first.wait(120)
            assert httpx.post(r.base_url + "/drain", timeout=10).json()["draining"] is True
            assert httpx.get(r.base_url + "/readiness", timeout=10).status_code == 503
            assert httpx.post(r.base_url + "/generate", json=_greedy("hi", 2), timeout=30).status_code == 503
            status, ids, _ = fut.result(timeout=180)
        assert status == 200 and len(ids) == 32
        assert _exit_code(r, 60) == 0, r.log()[-3000:]
    finally:
        if r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGKILL)
