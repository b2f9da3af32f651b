"""PD dispatch styles (issue 19): vLLM's prefill-first protocol on pdserve servers (kv_transfer_params, the KV
held under a lease until the decode claims it) and the router's --dispatch {parallel, prefill-first,
decode-first}. Real servers, the nixl backend, the real model."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import tempfile
import time

import httpx
import pytest

from pdserve.bench.datasets import WORDS
from tests.conftest import ServerProcess, free_port, stop_server, wait_ok
from tests.engine_helpers import PROMPTS
from tests.loadgen_helpers import TOOLS_DIR
from tests.pd_helpers import load, pd_pair, response_text, start_decode, start_prefill, stop_all
from tests.test_pd import wait_idle_and_free
from tests.test_router import Cluster, router

BACKEND = "nixl"
MAX_NEW = 12
LEASE_S = 8.0  # generous: a slow machine claims well within it


def kv_events_args() -> list[str]:
    return ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{free_port()}",
                                              "block_size": 16})]


def completion(prompt: str, max_tokens: int = MAX_NEW, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, **extra}


@pytest.fixture(scope="module")
def unified_ids(server):
    """Greedy completion token ids of the unified server for every prompt."""
    out = {}
    for p in PROMPTS:
        r = httpx.post(server.base_url + "/v1/completions", json=completion(p), timeout=120)
        assert r.status_code == 200, r.text
        out[p] = r.json()["choices"][0]["token_ids"]
    return out


@pytest.fixture(scope="module")
def pair():
    yield from pd_pair(BACKEND, ["--kv-lease-duration", str(LEASE_S), *kv_events_args()])


def prefill_first(prefill, prompt: str) -> dict:
    """vLLM's first leg: one token, not streamed; the answer says where the KV waits."""
    r = httpx.post(prefill.server.base_url + "/v1/completions", timeout=120,
                   json=completion(prompt, 1, kv_transfer_params={"do_remote_decode": True}))
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_port"] == prefill.bootstrap_port and params["remote_host"] == "127.0.0.1"
    assert isinstance(params["remote_bootstrap_room"], int) and params["remote_engine_id"]
    return params


def test_prefill_first_protocol_equals_unified(pair, unified_ids):
    prefill, decode = pair
    for p in PROMPTS:
        params = prefill_first(prefill, p)
        assert load(prefill.server)["kv_held_reqs"] == 1  # answered, KV held for the decode
        r = httpx.post(decode.base_url + "/v1/completions", json=completion(p, kv_transfer_params=params),
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == unified_ids[p], p
        assert "kv_transfer_params" not in r.json()
    assert load(prefill.server)["kv_held_reqs"] == 0
    wait_idle_and_free(prefill.server, decode)


def test_prefill_first_logprobs_rid_and_a_second_claim(pair, server):
    """The first token's logprob survives the hold; a request id in use by held KV is refused; a second claim of
    the same room fails at once."""
    prefill, decode = pair
    body = completion(PROMPTS[5], 4, logprobs=1, rid="held-rid-1", kv_transfer_params={"do_remote_decode": True})
    r = httpx.post(prefill.server.base_url + "/v1/completions", json={**body, "max_tokens": 1}, timeout=120)
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    again = httpx.post(prefill.server.base_url + "/v1/completions", json={**body, "max_tokens": 1}, timeout=120)
    assert again.status_code >= 400 and "in use" in again.json()["error"]["message"], again.text
    got = httpx.post(decode.base_url + "/v1/completions", timeout=120,
                     json=completion(PROMPTS[5], 4, logprobs=1, kv_transfer_params=params))
    ref = httpx.post(server.base_url + "/v1/completions", json=completion(PROMPTS[5], 4, logprobs=1), timeout=120)
    assert got.status_code == 200 and ref.status_code == 200, got.text
    got_lp, ref_lp = (x.json()["choices"][0]["logprobs"]["token_logprobs"] for x in (got, ref))
    assert got_lp == pytest.approx(ref_lp, abs=1e-3) and got_lp[0] != 0.0
    t0 = time.monotonic()
    second = httpx.post(decode.base_url + "/v1/completions", timeout=120,
                        json=completion(PROMPTS[5], 4, kv_transfer_params=params))
    assert second.status_code >= 500 and "claimed already" in second.json()["error"]["message"], second.text
    assert time.monotonic() - t0 < 30
    wait_idle_and_free(prefill.server, decode)


def test_prefill_first_chat_streamed(pair):
    prefill, decode = pair
    messages = [{"role": "user", "content": "Name a color."}]
    r = httpx.post(prefill.server.base_url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": 1, "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True, "kv_transfer_params": params}
    with httpx.stream("POST", decode.base_url + "/v1/chat/completions", json=body, timeout=120) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text.strip()
    wait_idle_and_free(prefill.server, decode)


def test_lease_expiry_frees_the_kv_and_the_late_decode_fails_cleanly(pair):
    prefill, decode = pair
    expired = load(prefill.server)["kv_leases_expired"]
    params = prefill_first(prefill, PROMPTS[0])
    deadline = time.monotonic() + LEASE_S + 30
    while load(prefill.server)["kv_held_reqs"]:
        assert time.monotonic() < deadline, "the lease did not run out"
        time.sleep(0.2)
    assert load(prefill.server)["kv_leases_expired"] == expired + 1
    wait_idle_and_free(prefill.server)  # its KV went back (into the cache, freed by the flush)
    t0 = time.monotonic()
    r = httpx.post(decode.base_url + "/v1/completions", json=completion(PROMPTS[0], kv_transfer_params=params),
                   timeout=120)
    assert r.status_code >= 500 and "lease" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 30  # told at once, not after a timeout
    wait_idle_and_free(decode)


def test_kv_transfer_params_bad_input(pair):
    prefill, decode = pair
    cases = [
        (decode.base_url, {"do_remote_decode": True}, {}, "needs a prefill server"),
        (prefill.server.base_url, {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1,
                                   "remote_bootstrap_room": 1}, {}, "needs a decode server"),
        (decode.base_url, {"do_remote_prefill": True}, {}, "remote_bootstrap_room"),
        (prefill.server.base_url, {"do_remote_decode": True}, {"stream": True}, "stream false"),
        (prefill.server.base_url, {"do_remote_decode": True, "do_remote_prefill": True}, {}, "exclude each other"),
        (prefill.server.base_url, {"do_remote_decode": True}, {"n": 2}, "n = 1"),
        (decode.base_url, {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 70000,
                           "remote_bootstrap_room": 1}, {}, "bootstrap_port"),
        (prefill.server.base_url, "yes", {}, "kv_transfer_params must be an object"),
    ]
    for url, params, extra, message in cases:
        r = httpx.post(url + "/v1/completions", json=completion("Hi", 2, kv_transfer_params=params, **extra),
                       timeout=30)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (params, r.text)
    wait_idle_and_free(prefill.server, decode)


@pytest.mark.parametrize("dispatch", ["prefill-first", "decode-first", "parallel"])
def test_router_dispatch_styles_equal_unified(pair, unified_ids, dispatch):
    prefill, decode = pair
    cluster = Cluster(BACKEND, [prefill], [decode])
    held = load(prefill.server)["kv_held_total"]
    with router(cluster.args("--dispatch", dispatch, "--policy", "round_robin")) as r:
        for p in PROMPTS[:2]:
            resp = httpx.post(r.base_url + "/v1/completions", json=completion(p), timeout=120)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["token_ids"] == unified_ids[p], (dispatch, p)
        body = completion(PROMPTS[2], stream=True)
        with httpx.stream("POST", r.base_url + "/v1/completions", json=body, timeout=120) as s:
            assert s.status_code == 200
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
        assert ids == unified_ids[PROMPTS[2]], dispatch
        # /generate (SGLang's native route) is not vLLM's: prefill-first sends it in parallel
        g = httpx.post(r.base_url + "/generate", timeout=120, json={
            "text": PROMPTS[0], "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
        assert g.status_code == 200 and g.json()["output_ids"] == unified_ids[PROMPTS[0]], g.text
    # prefill-first: the 3 OpenAI requests went through kv_transfer_params; the other styles use rooms
    assert load(prefill.server)["kv_held_total"] - held == (3 if dispatch == "prefill-first" else 0)
    assert load(prefill.server)["kv_held_reqs"] == 0
    wait_idle_and_free(prefill.server, decode)


def test_dead_prefill_and_the_recompute_policy(pair, unified_ids):
    """A draining prefill keeps serving the KV it holds (and stays up while it holds some); a decode claiming KV
    from a dead prefill fails within its deadline; under --kv-load-failure-policy recompute a decode prefills what
    did not come (a dead prefill's, a lease that ran out) itself: the same greedy output."""
    prefill, decode = pair
    recompute = start_decode(BACKEND, ["--kv-load-failure-policy", "recompute"])
    try:
        expired = prefill_first(prefill, PROMPTS[2])
        lone = start_prefill(BACKEND)
        try:
            during_drain, *dead = [prefill_first(lone, p) for p in (PROMPTS[1], PROMPTS[3], PROMPTS[4])]
            assert httpx.post(lone.server.base_url + "/drain", timeout=30).json()["draining"] is True
            time.sleep(1.0)
            assert lone.server.proc.poll() is None  # it holds KV for decodes: it waits for them
            r = httpx.post(decode.base_url + "/v1/completions", timeout=120,
                           json=completion(PROMPTS[1], kv_transfer_params=during_drain))
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == unified_ids[PROMPTS[1]], r.text
            assert lone.server.proc.poll() is None  # two rooms still held
        finally:
            stop_all(lone)
        t0 = time.monotonic()
        r = httpx.post(decode.base_url + "/v1/completions", json=completion(PROMPTS[3], kv_transfer_params=dead[0]),
                       timeout=120)
        assert r.status_code >= 500 and "prefill" in r.json()["error"]["message"], r.text
        assert time.monotonic() - t0 < 60, r.text
        deadline = time.monotonic() + LEASE_S + 30
        while load(prefill.server)["kv_held_reqs"]:
            assert time.monotonic() < deadline, "the lease did not run out"
            time.sleep(0.2)
        for p, kvt in ((PROMPTS[2], expired), (PROMPTS[4], dead[1])):
            r = httpx.post(recompute.base_url + "/v1/completions", json=completion(p, kv_transfer_params=kvt),
                           timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == unified_ids[p], p
        assert load(recompute)["kv_load_recomputed"] == 2
        wait_idle_and_free(recompute, decode)
    finally:
        stop_all(recompute)


VLLM_ROUTER = os.path.join(TOOLS_DIR, "vllm-router", "bin", "vllm-router")
CHAT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12, "temperature": 0}
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}


def test_vllm_router_drives_pdserve(pair, server):
    """vLLM's own router (PyPI vllm-router, --vllm-pd-disaggregation, NIXL connector) in front of pdserve's
    prefill and decode: it speaks kv_transfer_params; chat and completions equal the unified server's output."""
    if not os.access(VLLM_ROUTER, os.X_OK):
        pytest.fail("vllm-router is not installed (make loadgen installs it under .venv-tools/vllm-router)")
    prefill, decode = pair
    held = load(prefill.server)["kv_held_total"]
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="vllm-router-", suffix=".log")
    cmd = [VLLM_ROUTER, "--vllm-pd-disaggregation", "--prefill", prefill.server.base_url, "--decode", decode.base_url,
           "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin", "--kv-connector", "nixl"]
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    r = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ok(r, "/health", 60, "vllm-router", interval_s=0.3, request_timeout_s=5)
        model = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for (path, body), stream in itertools.product((("/v1/chat/completions", CHAT),
                                                       ("/v1/completions", COMPLETION)), (False, True)):
            body = {**body, "model": model, "stream": stream}
            ref = httpx.post(server.base_url + path, json=body, timeout=120)
            got = httpx.post(r.base_url + path, json=body, timeout=120)
            assert ref.status_code == 200 and got.status_code == 200, (got.text, r.log()[-3000:])
            assert response_text(path, got, stream) == response_text(path, ref, stream) != ""
    finally:
        stop_server(r)
        os.unlink(log_path)
    assert load(prefill.server)["kv_held_total"] - held == 4  # each went prefill first, through kv_transfer_params
    wait_idle_and_free(prefill.server, decode)


def test_kv_aware_prefill_policy_routes_by_the_prefills_caches(pair):
    """Two prefills publishing KV events; the router (--prefill-policy kv_aware) sends every prompt of a group
    to the prefill that cached the group's prefix: each follow-up finds the whole prefix cached there."""
    prefill, decode = pair
    other = start_prefill(BACKEND, kv_events_args())
    rng = random.Random(5)
    try:
        cluster = Cluster(BACKEND, [prefill, other], [decode])
        with router(cluster.args("--prefill-policy", "kv_aware", "--decode-policy", "round_robin")) as r:
            for group in range(3):
                prefix = " ".join(rng.choices(WORDS, k=64))
                for question in range(3):
                    body = completion(f"{prefix} question {question}?", 2)
                    resp = httpx.post(r.base_url + "/v1/completions", json=body, timeout=120)
                    assert resp.status_code == 200, resp.text
                    cached = resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                    if question:
                        assert cached >= 64 - 16, (group, question, cached)  # the prefix, to a block
                    time.sleep(0.2)  # the prefill's events reach the router
        wait_idle_and_free(prefill.server, other.server, decode)
    finally:
        stop_all(other)
