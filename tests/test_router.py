"""The router (and mini_lb) end to end: real prefill/decode servers (2 + 2, started once for the module), real
router processes in front of them. The last test kills a decode server, so it stays last."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT, ServerProcess, free_port, spawn, stop_server, wait_ok
from tests.pd_helpers import Prefill, start_decode, start_prefill, stop_all, with_bootstrap

KEY = "router-key-1"
SHARED = "You are a meticulous assistant. Answer in one short sentence, citing nothing. " * 6  # ~500 chars


def _backend_works(name: str) -> bool:
    if name == "fake":
        return True
    packages = {"nixl": ("nixl", "nixl_cu12"), "mooncake": ("mooncake",)}[name]
    return (any(importlib.util.find_spec(p) is not None for p in packages)
            and importlib.util.find_spec(f"pdserve.disagg.backends.{name}") is not None)


# A backend that moves KV makes the whole greedy output comparable; fake only the first token.
BACKENDS = [b for b in os.environ.get("PDSERVE_ROUTER_BACKENDS", "").split(",") if b] or \
    ([b for b in ("nixl", "mooncake") if _backend_works(b)][:1] or ["fake"])


# ---- helpers -----------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    backend: str
    prefills: list[Prefill]
    decodes: list[ServerProcess]
    dead: set[str] = field(default_factory=set)

    def args(self, *extra: str) -> list[str]:
        out = ["--pd-disaggregation"]
        for p in self.prefills:
            out += ["--prefill", p.server.base_url, str(p.bootstrap_port)]
        for d in self.decodes:
            out += ["--decode", d.base_url]
        return out + list(extra)


def start_router(args: list[str], api_key: str | None = None, module: str = "pdserve.launch_router",
                 ready: bool = True, timeout: float = 60) -> ServerProcess:
    r = spawn(module, args, api_key, log_prefix="pdserve-router-")
    path = "/readiness" if ready and module == "pdserve.launch_router" else "/health"
    return wait_ok(r, path, timeout, "router", interval_s=0.2, request_timeout_s=5)


@contextmanager
def router(args: list[str], **kw) -> Iterator[ServerProcess]:
    r = start_router(args, **kw)
    ok = False
    try:
        yield r
        ok = True
    finally:
        stop_server(r)
        if not ok:
            print(f"\n----- router log -----\n{r.log()[-15000:]}", file=sys.stderr)
        os.unlink(r.log_path)


def counters(r: ServerProcess, name: str = "pdserve_router_worker_requests") -> dict[tuple[str, str], float]:
    """{(role, worker url): value} of a per-worker counter."""
    text = httpx.get(r.base_url + "/metrics", headers=r.headers, timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            for s in fam.samples:
                if s.name == name + "_total":
                    out[(s.labels["role"], s.labels["worker"])] = s.value
    return out


def scalar(r: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(r.base_url + "/metrics", headers=r.headers, timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def chosen(before: dict, after: dict, role: str) -> list[str]:
    return [url for (rl, url), v in after.items() if rl == role and v > before.get((rl, url), 0)]


def greedy(prompt: str, n: int = 8, **extra) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}, **extra}


def post(r: ServerProcess, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(r.base_url + path, json=body, headers=r.headers, timeout=timeout)


def sse_lines(r: ServerProcess, path: str, body: dict, timeout: float = 120) -> tuple[int, list[str]]:
    with httpx.stream("POST", r.base_url + path, json=body, headers=r.headers, timeout=timeout) as resp:
        return resp.status_code, [line for line in resp.iter_lines() if line]


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=BACKENDS)
def pd(request) -> Iterator[Cluster]:
    with cf.ThreadPoolExecutor(4) as ex:
        fp = [ex.submit(start_prefill, request.param) for _ in range(2)]
        fd = [ex.submit(start_decode, request.param) for _ in range(2)]
        started, errors = [], []
        for f in fp + fd:
            try:
                started.append(f.result())
            except Exception as e:  # noqa: BLE001 - stop what did start, then fail
                errors.append(e)
    if errors:
        stop_all(*started)
        raise errors[0]
    cluster = Cluster(request.param, started[:2], started[2:])
    yield cluster
    stop_all(*cluster.prefills, *cluster.decodes)


@pytest.fixture(scope="module")
def rr_router(pd) -> Iterator[ServerProcess]:
    """Round robin for both roles; most tests use it."""
    with router(pd.args("--policy", "round_robin")) as r:
        yield r


# ---- routing through the router ----------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,"]


def test_greedy_output_matches_unified(pd, rr_router, server):
    for p in PROMPTS:
        ref = httpx.post(server.base_url + "/generate", json=greedy(p), timeout=120).json()["output_ids"]
        r = post(rr_router, "/generate", greedy(p))
        assert r.status_code == 200, r.text
        out = r.json()["output_ids"]
        if pd.backend == "fake":  # no KV moves: only the prefill's first token is meaningful
            assert out[0] == ref[0], p
        else:
            assert out == ref, p


@pytest.mark.parametrize("stream", [False, True])
def test_all_generation_endpoints(rr_router, stream):
    chat = {"model": "m", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "stream": stream}
    comp = {"model": "m", "prompt": "Once upon a time", "max_tokens": 4, "stream": stream}
    gen = {**greedy("Hello", 4), "stream": stream}
    for path, body, obj in (("/generate", gen, None), ("/v1/completions", comp, "text_completion"),
                            ("/v1/chat/completions", chat, "chat.completion")):
        if not stream:
            r = post(rr_router, path, body)
            assert r.status_code == 200, (path, r.text)
            assert r.json().get("object", obj) == obj
            continue
        status, lines = sse_lines(rr_router, path, body)
        assert status == 200 and lines[-1] == "data: [DONE]", (path, lines)
        assert len(lines) >= 2 and not any('"error"' in x for x in lines), lines


def test_stream_chunks_arrive_as_generated(rr_router):
    """Chunks are relayed as the decode produces them, not buffered to the end."""
    body = {"text": "Count slowly:", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}, "stream": True}
    arrivals = []
    with httpx.stream("POST", rr_router.base_url + "/generate", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] > 0.05  # spread out over the generation


def test_batch_generate_and_input_logprobs(rr_router):
    r = post(rr_router, "/generate", greedy(["Hello there", "One two three"], 3))
    assert r.status_code == 200 and len(r.json()) == 2, r.text
    body = greedy("one two three four five", 2, return_logprob=True, logprob_start_len=0)
    for stream in (False, True):
        if stream:
            status, lines = sse_lines(rr_router, "/generate", {**body, "stream": True})
            meta = orjson.loads(lines[-2][6:])["meta_info"]
        else:
            meta = post(rr_router, "/generate", body).json()["meta_info"]
        # The prefill computed the input logprobs; the router put them into the decode's answer.
        assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"], meta
        assert len(meta["output_token_logprobs"]) == 2


def test_info_endpoints_and_flush(pd, rr_router):
    info = httpx.get(rr_router.base_url + "/get_server_info", timeout=30).json()
    assert len(info["prefill"]) == 2 and len(info["decode"]) == 2
    assert {x["disaggregation_mode"] for x in info["prefill"]} == {"prefill"}
    assert httpx.get(rr_router.base_url + "/get_model_info", timeout=30).json()["is_generation"] is True
    assert httpx.get(rr_router.base_url + "/v1/models", timeout=30).json()["object"] == "list"
    r = httpx.post(rr_router.base_url + "/flush_cache", timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 4, r.text
    assert httpx.get(rr_router.base_url + "/health", timeout=5).status_code == 200
    m = httpx.get(rr_router.base_url + "/metrics", timeout=10).text
    assert "pdserve_router_worker_request_duration_seconds_bucket" in m and "pdserve_router_requests_total" in m


def test_client_errors_pass_through_unchanged(pd, rr_router):
    bad = {"text": 1, "sampling_params": {}}
    direct = httpx.post(pd.decodes[0].base_url + "/generate", json=bad, timeout=30)
    retries = scalar(rr_router, "pdserve_router_retries_total")
    r = post(rr_router, "/generate", bad)
    assert r.status_code == direct.status_code == 400
    assert r.json() == direct.json()
    assert scalar(rr_router, "pdserve_router_retries_total") == retries  # 4xx: never retried
    r = httpx.post(rr_router.base_url + "/generate", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(rr_router.base_url + "/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


# ---- policies ----------------------------------------------------------------------------------------------
def test_round_robin_alternates(pd, rr_router):
    seq = {"prefill": [], "decode": []}
    for i in range(4):
        before = counters(rr_router)
        assert post(rr_router, "/generate", greedy(f"Hello {i}", 2)).status_code == 200
        after = counters(rr_router)
        for role in seq:
            (url,) = chosen(before, after, role)
            seq[role].append(url)
    for role, urls in seq.items():
        assert urls[0] != urls[1] and urls[0] == urls[2] and urls[1] == urls[3], (role, urls)


def test_cache_aware_keeps_a_prefix_on_one_prefill(pd):
    with router(pd.args("--prefill-policy", "cache_aware", "--decode-policy", "round_robin")) as r:
        groups = {"A": SHARED, "B": "Translate the following text into French, keeping the tone. " * 8}
        picks: dict[str, list[str]] = {"A": [], "B": []}
        for i in range(4):
            for g, prefix in groups.items():
                before = counters(r)
                resp = post(r, "/generate", greedy(f"{prefix} Question {i}: what is {i} plus {i}?", 2))
                assert resp.status_code == 200, resp.text
                picks[g] += chosen(before, counters(r), "prefill")
        assert len(set(picks["A"])) == 1 and len(set(picks["B"])) == 1, picks
        assert picks["A"][0] != picks["B"][0], picks  # a new prefix goes to the worker with less cached text


def test_power_of_two_avoids_a_loaded_decode(pd):
    args = pd.args("--prefill-policy", "round_robin", "--decode-policy", "power_of_two",
                   "--load-monitor-interval", "0.2")
    busy = pd.decodes[0]
    holds = [with_bootstrap({"text": "hold", "sampling_params": {"max_new_tokens": 1}, "rid": f"hold-{i}"},
                            pd.prefills[0]) for i in range(2)]
    with router(args) as r, cf.ThreadPoolExecutor(2) as ex:
        # Two requests wait on the busy decode for KV that never comes: it reports num_reqs=2.
        futs = [ex.submit(httpx.post, busy.base_url + "/generate", json=h, timeout=120) for h in holds]
        try:
            deadline = time.monotonic() + 30
            while httpx.get(busy.base_url + "/get_load", timeout=10).json()[0]["num_reqs"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.6)  # a few load polls
            before = counters(r)
            for i in range(6):
                assert post(r, "/generate", greedy(f"Hi {i}", 2)).status_code == 200
            after = counters(r)
            assert after[("decode", busy.base_url)] == before[("decode", busy.base_url)]
            other = pd.decodes[1].base_url
            assert after[("decode", other)] - before[("decode", other)] == 6
        finally:
            httpx.post(busy.base_url + "/abort_request", json={"abort_all": True}, timeout=30)
            for f in futs:
                f.result()


# ---- non-PD mode -------------------------------------------------------------------------------------------
def test_regular_mode_in_front_of_unified_server(server):
    with router(["--worker-urls", server.base_url, "--policy", "cache_aware"]) as r:
        direct = httpx.post(server.base_url + "/generate", json=greedy("The capital of France is"), timeout=120)
        via = post(r, "/generate", greedy("The capital of France is"))
        assert via.status_code == 200 and via.json()["output_ids"] == direct.json()["output_ids"]
        status, lines = sse_lines(r, "/v1/chat/completions", {"model": "m", "max_tokens": 4, "stream": True,
                                                              "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert httpx.get(r.base_url + "/v1/models", timeout=30).status_code == 200
        assert httpx.get(r.base_url + "/get_server_info", timeout=30).json()["workers"][0]["url"] == server.base_url


# ---- membership, health, auth ------------------------------------------------------------------------------
def test_workers_at_run_time_and_readiness(pd):
    p, d = pd.prefills[0], pd.decodes[0]
    with router(["--pd-disaggregation", "--health-check-interval-secs", "1"], ready=False) as r:
        def ready() -> int:
            return httpx.get(r.base_url + "/readiness", timeout=10).status_code

        assert ready() == 503
        assert post(r, "/generate", greedy("hi", 2)).status_code == 503
        add = {"url": p.server.base_url, "role": "prefill", "bootstrap_port": p.bootstrap_port}
        assert httpx.post(r.base_url + "/workers", json=add, timeout=30).json()["worker"]["healthy"] is True
        assert ready() == 503  # no decode yet
        assert httpx.post(r.base_url + "/workers", json=add, timeout=30).status_code == 400  # already there
        assert httpx.post(r.base_url + "/workers", json={"url": d.base_url, "role": "regular"},
                          timeout=30).status_code == 400  # not a PD role
        assert httpx.post(r.base_url + "/workers", json={"url": d.base_url, "role": "decode"},
                          timeout=30).status_code == 200
        assert ready() == 200
        assert post(r, "/generate", greedy("hi", 2)).status_code == 200
        listed = httpx.get(r.base_url + "/workers", timeout=10).json()["workers"]
        assert {(w["url"], w["role"]) for w in listed} == {(p.server.base_url, "prefill"), (d.base_url, "decode")}
        assert httpx.request("DELETE", r.base_url + "/workers", json={"url": d.base_url}, timeout=10).status_code == 200
        assert httpx.request("DELETE", r.base_url + "/workers", json={"url": d.base_url}, timeout=10).status_code == 404
        assert ready() == 503
        resp = post(r, "/generate", greedy("hi", 2))
        assert resp.status_code == 503 and "decode" in resp.json()["error"]["message"]


def test_starts_with_a_dead_worker_and_serves(pd):
    dead = f"http://127.0.0.1:{free_port()}"
    args = pd.args("--prefill", dead, "--decode", f"http://127.0.0.1:{free_port()}", "--policy", "round_robin")
    with router(args) as r:
        for i in range(4):
            resp = post(r, "/generate", greedy(f"Hi {i}", 2))
            assert resp.status_code == 200, resp.text
        workers = {w["url"]: w for w in httpx.get(r.base_url + "/workers", timeout=10).json()["workers"]}
        assert workers[dead]["healthy"] is False and workers[pd.decodes[0].base_url]["healthy"] is True
        assert scalar(r, "pdserve_router_retries_total") == 0  # unhealthy workers are not even tried


def test_dead_worker_in_rotation_costs_a_retry_not_an_error(pd):
    """With health checks off, a dead prefill stays in rotation: each request that picks it is retried on the
    other one at once (the decode leg is cancelled), and the client sees only successes."""
    dead = f"http://127.0.0.1:{free_port()}"
    args = ["--pd-disaggregation", "--prefill", dead, "--prefill", pd.prefills[0].server.base_url,
            str(pd.prefills[0].bootstrap_port), "--decode", pd.decodes[0].base_url, "--policy", "round_robin",
            "--disable-health-check", "--cb-failure-threshold", "100"]
    with router(args) as r:
        for i in range(4):
            t0 = time.monotonic()
            assert post(r, "/generate", greedy(f"Hi {i}", 2)).status_code == 200
            assert time.monotonic() - t0 < 20
        assert scalar(r, "pdserve_router_retries_total") >= 1
        assert counters(r, "pdserve_router_worker_errors")[("prefill", dead)] >= 1
    time.sleep(1.5)  # cancelled decode legs are aborted on the decode too
    assert httpx.get(pd.decodes[0].base_url + "/get_load", timeout=10).json()[0]["num_reqs"] == 0


def test_decode_only_fallback_when_no_prefill_is_healthy(pd, server):
    """No healthy prefill: the decode prefills the request itself (same greedy output as a unified server),
    counted in the router's metrics and the decode's load; off with --disable-decode-fallback."""
    d = pd.decodes[0]
    dead = f"http://127.0.0.1:{free_port()}"
    local_before = httpx.get(d.base_url + "/get_load", timeout=10).json()[0]["num_local_prefill_reqs"]
    with router(["--pd-disaggregation", "--prefill", dead, "--decode", d.base_url]) as r:
        assert httpx.get(r.base_url + "/readiness", timeout=10).status_code == 200  # a decode alone can serve
        for p in PROMPTS:
            ref = httpx.post(server.base_url + "/generate", json=greedy(p), timeout=120).json()["output_ids"]
            resp = post(r, "/generate", greedy(p))
            assert resp.status_code == 200, resp.text
            assert resp.json()["output_ids"] == ref, p
        status, lines = sse_lines(r, "/v1/chat/completions", {"model": "m", "max_tokens": 4, "stream": True,
                                                              "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert scalar(r, "pdserve_router_decode_fallbacks_total") == len(PROMPTS) + 1
        assert scalar(r, "pdserve_router_decode_fallbacks_total", route="chat") == 1
    load = httpx.get(d.base_url + "/get_load", timeout=10).json()[0]
    assert load["num_local_prefill_reqs"] == local_before + len(PROMPTS) + 1 and load["num_reqs"] == 0
    with router(["--pd-disaggregation", "--prefill", dead, "--decode", d.base_url, "--disable-decode-fallback"],
                ready=False) as r:
        assert httpx.get(r.base_url + "/readiness", timeout=10).status_code == 503
        resp = post(r, "/generate", greedy("hi", 2))
        assert resp.status_code == 503 and "prefill" in resp.json()["error"]["message"]


def test_api_key(pd):
    with router(pd.args(), api_key=KEY) as r:
        assert httpx.get(r.base_url + "/health", timeout=5).status_code == 200
        for method, path in (("POST", "/generate"), ("GET", "/metrics"), ("GET", "/workers"), ("GET", "/readiness")):
            resp = httpx.request(method, r.base_url + path, json=greedy("hi", 2), timeout=10)
            assert resp.status_code == 401, path
            assert resp.json()["error"]["type"] == "authentication_error"
        assert post(r, "/generate", greedy("hi", 2)).status_code == 200  # r.headers carries the key


def test_mini_lb(pd):
    p, d = pd.prefills[0], pd.decodes[0]
    args = ["--prefill", p.server.base_url, "--decode", d.base_url, "--prefill-bootstrap-ports", str(p.bootstrap_port)]
    with router(args, module="pdserve.mini_lb", ready=False) as lb:
        assert post(lb, "/generate", greedy("The capital of France is", 4)).status_code == 200
        status, lines = sse_lines(lb, "/v1/chat/completions", {"model": "m", "max_tokens": 4, "stream": True,
                                                               "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert httpx.get(lb.base_url + "/v1/models", timeout=30).status_code == 200
        assert len(httpx.get(lb.base_url + "/get_server_info", timeout=30).json()["decode"]) == 1


def test_cli_route_subcommand():
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "route", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0 and "--pd-disaggregation" in out.stdout and "--prefill-policy" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "serve", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0 and "--disaggregation-mode" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "route", "--prefill", "http://x:1"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 2 and "--pd-disaggregation" in out.stderr


# ---- failure under load (kills a decode server: keep last) -------------------------------------------------
def test_kill_decode_during_load(pd):
    victim, survivor = pd.decodes[1], pd.decodes[0]
    # Without stream migration (tests/test_migration.py has it): a broken stream ends with a clear error.
    args = pd.args("--policy", "round_robin", "--health-check-interval-secs", "0.5", "--health-failure-threshold",
                   "1", "--retry-initial-backoff-ms", "5", "--migration-limit", "0")
    long = {"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
    with router(args) as r, cf.ThreadPoolExecutor(8) as ex:
        started = [threading.Event() for _ in range(6)]

        def stream(i: int) -> tuple[int, list[str]]:
            lines = []
            with httpx.stream("POST", r.base_url + "/generate", json={**long, "stream": True}, timeout=120) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        started[i].set()
                return resp.status_code, lines

        futs = [ex.submit(stream, i) for i in range(4)]
        plain = [ex.submit(post, r, "/generate", long) for _ in range(2)]
        for e in started[:4]:
            assert e.wait(120), "streams did not start"
        t_kill = time.monotonic()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        pd.dead.add(victim.base_url)
        streams = [f.result(timeout=90) for f in futs]
        plains = [f.result(timeout=90) for f in plain]
        assert time.monotonic() - t_kill < 60  # nothing hangs
        broken = [lines for status, lines in streams if any('"error"' in x for x in lines)]
        assert broken, "round robin put streams on the killed decode: they must end with an error"
        for status, lines in streams:
            assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
        for lines in broken:
            err = next(x for x in lines if '"error"' in x)
            assert victim.base_url in err and "mid-stream" in err, err
        for resp in plains:  # retried on the other pair before any byte went out, or a clear error
            assert resp.status_code == 200 or resp.json()["error"]["code"] >= 500, resp.text
        # New requests: all answered by the surviving decode, promptly.
        for i in range(6):
            t0 = time.monotonic()
            resp = post(r, "/generate", greedy(f"after {i}", 2))
            assert resp.status_code == 200 and time.monotonic() - t0 < 20, resp.text
        time.sleep(1.5)
        workers = {w["url"]: w for w in httpx.get(r.base_url + "/workers", timeout=10).json()["workers"]}
        assert workers[victim.base_url]["healthy"] is False and workers[survivor.base_url]["healthy"] is True
        before = counters(r)
        for i in range(2):
            assert post(r, "/generate", greedy(f"later {i}", 2)).status_code == 200
        assert chosen(before, counters(r), "decode") == [survivor.base_url]
