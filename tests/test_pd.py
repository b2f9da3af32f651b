"""Prefill/decode disaggregation end to end: real servers, real transfer backends, real model."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.engine_helpers import PROMPTS
from tests.pd_helpers import flush, load, pd_pair, pd_post, start_decode, start_prefill, stop_all

BACKENDS = ["nixl", "mooncake", "fake"]
MAX_NEW = 16


def greedy_body(prompt: str, n: int = MAX_NEW) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}}


def wait_idle_and_free(*servers, timeout: float = 30) -> None:
    """Every server ends with no request and, after a cache flush, no KV slot in use."""
    deadline = time.monotonic() + timeout
    for s in servers:
        while True:
            flush(s)
            ld = load(s)
            if ld["num_reqs"] == 0 and ld["num_tokens"] == 0:
                break
            assert time.monotonic() < deadline, f"{s.base_url} still busy: {ld}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def unified_outputs(server):
    """Greedy output ids of the unified server (the `server` fixture) for every prompt."""
    out = {}
    for p in PROMPTS:
        r = httpx.post(server.base_url + "/generate", json=greedy_body(p), timeout=120)
        assert r.status_code == 200, r.text
        out[p] = r.json()["output_ids"]
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def pd(request):
    for prefill, decode in pd_pair(request.param):
        yield request.param, prefill, decode


def test_pd_greedy_equals_unified(pd, unified_outputs):
    backend, prefill, decode = pd
    for p in PROMPTS:
        rp, rd = pd_post(prefill, decode, "/generate", greedy_body(p))
        assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
        assert rp.json()["output_ids"] == unified_outputs[p][:1]  # the prefill answers the first token
        if backend == "fake":  # no data moves: only the control flow and the first token are right
            assert rd.json()["output_ids"][0] == unified_outputs[p][0]
        else:
            assert rd.json()["output_ids"] == unified_outputs[p], p
    wait_idle_and_free(prefill.server, decode)


def test_pd_16_concurrent(pd, unified_outputs):
    backend, prefill, decode = pd
    prompts = (PROMPTS * 2)[:16]
    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda p: pd_post(prefill, decode, "/generate", greedy_body(p)), prompts))
    for p, (rp, rd) in zip(prompts, results):
        assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
        if backend != "fake":
            assert rd.json()["output_ids"] == unified_outputs[p], p
    wait_idle_and_free(prefill.server, decode)


def test_pd_chat_streamed(pd):
    backend, prefill, decode = pd
    body = {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0,
            "stream": True}
    rp, rd = pd_post(prefill, decode, "/v1/chat/completions", body)
    assert rp.status_code == 200 and rd.status_code == 200
    assert rd.text.strip().endswith("data: [DONE]")
    wait_idle_and_free(prefill.server, decode)


def test_room_reuse_gets_fresh_state(pd, unified_outputs):
    backend, prefill, decode = pd
    if backend == "fake":
        pytest.skip("outputs past the first token are only meaningful when KV moves")
    room = 4242
    for p in PROMPTS[:3]:  # the same room, one request after another
        rp, rd = pd_post(prefill, decode, "/generate", greedy_body(p), room=room)
        assert rd.json()["output_ids"] == unified_outputs[p]
    wait_idle_and_free(prefill.server, decode)


def test_request_without_room_is_rejected_by_a_prefill_and_prefilled_by_a_decode(pd, unified_outputs):
    """A prefill needs a room (400); a decode given no bootstrap field at all prefills the prompt itself (the
    router's decode-only fallback) and answers as a unified server would."""
    _, prefill, decode = pd
    r = httpx.post(prefill.server.base_url + "/generate", json=greedy_body("hi"), timeout=30)
    assert r.status_code == 400 and "bootstrap" in r.json()["error"]["message"]
    r = httpx.post(decode.base_url + "/generate", json=greedy_body(PROMPTS[0]), timeout=120)
    assert r.status_code == 200 and r.json()["output_ids"] == unified_outputs[PROMPTS[0]]
    half = {**greedy_body("hi"), "bootstrap_room": 7}  # a room without a host: a half-injected request
    r = httpx.post(decode.base_url + "/generate", json=half, timeout=30)
    assert r.status_code == 400 and "bootstrap_host" in r.json()["error"]["message"]
    wait_idle_and_free(prefill.server, decode)


def test_duplicate_live_room_is_rejected(pd):
    _, prefill, decode = pd
    body = {**greedy_body("hi"), "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": 777}
    with cf.ThreadPoolExecutor(1) as ex:  # first request holds the room on the decode (no prefill half sent)
        first = ex.submit(httpx.post, decode.base_url + "/generate", json=body, timeout=60)
        time.sleep(1.0)
        second = httpx.post(decode.base_url + "/generate", json=body, timeout=30)
        assert second.status_code == 400 and "777" in second.json()["error"]["message"]
        httpx.post(decode.base_url + "/abort_request", json={"abort_all": True}, timeout=30)
        assert first.result().status_code in (200, 500)
    wait_idle_and_free(prefill.server, decode)


@pytest.fixture(scope="module")
def pd_2x2():
    """2 prefill + 2 decode servers (mooncake): used as 2P+1D and as 1P+2D."""
    servers = []
    try:
        prefills = [start_prefill("mooncake") for _ in range(2)]
        servers += prefills
        decodes = [start_decode("mooncake") for _ in range(2)]
        servers += decodes
    except Exception:
        stop_all(*servers)
        raise
    yield prefills, decodes
    stop_all(*servers)


@pytest.mark.parametrize("num_prefill, num_decode", [(2, 1), (1, 2)])
def test_pd_topologies(pd_2x2, unified_outputs, num_prefill, num_decode):
    prefills, decodes = pd_2x2
    prefills, decodes = prefills[:num_prefill], decodes[:num_decode]
    jobs = [(p, prefills[i % num_prefill], decodes[(i // num_prefill) % num_decode] if num_decode > 1
             else decodes[0]) for i, p in enumerate(PROMPTS)]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(lambda j: pd_post(j[1], j[2], "/generate", greedy_body(j[0])), jobs))
    for (p, _, _), (rp, rd) in zip(jobs, results):
        assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
        assert rd.json()["output_ids"] == unified_outputs[p], p
    wait_idle_and_free(*[pf.server for pf in prefills], *decodes)
