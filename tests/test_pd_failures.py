"""PD failure handling: aborts cross sides, a killed prefill, timeouts. Every case frees KV on both sides."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest

from tests.pd_helpers import Prefill, load, pd_post, start_decode, start_prefill, stop_all, with_bootstrap
from tests.test_pd import greedy_body, wait_idle_and_free

BACKEND = os.environ.get("PDSERVE_TEST_FAILURE_BACKEND", "nixl")
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 250  # ~2.5k tokens: seconds of prefill


@pytest.fixture(scope="module")
def pd():
    prefill = start_prefill(BACKEND, env={"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "2"})
    decode = start_decode(BACKEND, env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "4"})
    state = {"prefill": prefill, "decode": decode}
    yield state
    stop_all(state["prefill"], state["decode"])


def _post(url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(url, json=body, timeout=timeout)


def pd_failures(server) -> tuple[float, float]:
    """(sglang:num_bootstrap_failed_reqs_total, sglang:num_transfer_failed_reqs_total) of a server."""
    values = {}
    for fam in text_string_to_metric_families(httpx.get(server.base_url + "/metrics", timeout=30).text):
        for sample in fam.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return (values["sglang:num_bootstrap_failed_reqs_total"], values["sglang:num_transfer_failed_reqs_total"])


def test_bootstrap_timeout(pd):
    prefill: Prefill = pd["prefill"]
    bootstrap_failed, transfer_failed = pd_failures(prefill.server)
    t0 = time.monotonic()
    r = _post(prefill.server.base_url + "/generate", with_bootstrap({"text": "hello", "sampling_params": {}}, prefill))
    assert r.status_code == 500 and "bootstrap timeout" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 15
    wait_idle_and_free(prefill.server)
    assert pd_failures(prefill.server) == (bootstrap_failed + 1, transfer_failed)  # counted once, as SGLang does


def test_waiting_timeout(pd):
    prefill, decode = pd["prefill"], pd["decode"]
    before = sum(pd_failures(decode))
    t0 = time.monotonic()
    r = _post(decode.base_url + "/generate", with_bootstrap({"text": "hello", "sampling_params": {}}, prefill))
    assert r.status_code == 500 and "waiting timeout" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 20
    wait_idle_and_free(prefill.server, decode)
    assert sum(pd_failures(decode)) == before + 1


@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_abort_reaches_the_other_side(pd, side):
    prefill, decode = pd["prefill"], pd["decode"]
    failures_before = [pd_failures(s) for s in (prefill.server, decode)]
    body = with_bootstrap({"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 8}, "rid": f"abort-{side}"},
                          prefill)
    with cf.ThreadPoolExecutor(2) as ex:
        fp = ex.submit(_post, prefill.server.base_url + "/generate", body)
        fd = ex.submit(_post, decode.base_url + "/generate", body)
        time.sleep(1.5)  # the prefill is computing the long prompt now
        target = decode if side == "decode" else prefill.server
        httpx.post(target.base_url + "/abort_request", json={"rid": body["rid"]}, timeout=30)
        rp, rd = fp.result(), fd.result()
    # Both halves end in an error, neither waits for a timeout.
    assert rp.status_code == 500 and rd.status_code == 500, (rp.text, rd.text)
    assert "abort" in rp.json()["error"]["message"] and "abort" in rd.json()["error"]["message"]
    wait_idle_and_free(prefill.server, decode)
    assert [pd_failures(s) for s in (prefill.server, decode)] == failures_before  # an abort is not a PD failure


def test_prefill_killed_then_restarted(pd):
    prefill, decode = pd["prefill"], pd["decode"]
    body = {"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 8}}
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(_post, decode.base_url + "/generate", with_bootstrap(body, prefill)) for _ in range(2)]
        futs += [ex.submit(_post, prefill.server.base_url + "/generate", with_bootstrap(body, prefill))]
        time.sleep(2.0)
        t_kill = time.monotonic()
        os.killpg(prefill.server.proc.pid, signal.SIGKILL)
        for f in futs[:2]:
            r = f.result()
            assert r.status_code == 500 and "unreachable" in r.json()["error"]["message"], r.text
        detected = time.monotonic() - t_kill
    assert detected < 0.5 * 2 + 8, detected  # interval x max_failure + slack
    prefill.server.proc.wait(timeout=10)
    # The failed requests' destinations stay quarantined (an unreachable prefill may only be partitioned away
    # and still write) until a new prefill process owns the address or their TTL ends.
    assert load(decode)["num_reqs"] == 0 and load(decode)["num_tokens"] > 0
    # A prefill restarted on the same address is served again without restarting the decode.
    port = int(prefill.server.base_url.rsplit(":", 1)[1])
    new = start_prefill(BACKEND, env=prefill.env, port=port, bootstrap_port=prefill.bootstrap_port)
    pd["prefill"] = new
    rp, rd = pd_post(new, decode, "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4,
                                                                                      "temperature": 0}})
    assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
    assert rd.json()["meta_info"]["completion_tokens"] == 4
    wait_idle_and_free(new.server, decode)
    assert load(decode)["num_reqs"] == 0


def test_prefill_restarted_within_the_heartbeat_window():
    """A prefill killed and restarted on the same address before the decode's heartbeats miss it: the decode
    notices the new server_id on its next heartbeat, fails the old process's rooms at once (not after the
    waiting timeout), frees their quarantined destinations, and serves through the new process."""
    slow_heartbeat = {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "1",
                      "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "120"}
    prefill = start_prefill(BACKEND)
    decode = start_decode(BACKEND, env=slow_heartbeat)
    try:
        body = {"text": "hello there", "sampling_params": {"max_new_tokens": 8}}  # the prefill never gets it
        with cf.ThreadPoolExecutor(2) as ex:
            fd = ex.submit(_post, decode.base_url + "/generate", with_bootstrap(body, prefill), 300)
            time.sleep(1.0)
            assert load(decode)["num_tokens"] > 0  # its destination is out
            os.killpg(prefill.server.proc.pid, signal.SIGKILL)
            prefill.server.proc.wait(timeout=10)
            port = int(prefill.server.base_url.rsplit(":", 1)[1])
            prefill = start_prefill(BACKEND, env=prefill.env, port=port, bootstrap_port=prefill.bootstrap_port)
            r = fd.result()
        assert r.status_code == 500 and "restarted" in r.json()["error"]["message"], r.text
        rp, rd = pd_post(prefill, decode, "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
        assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
        wait_idle_and_free(prefill.server, decode)
    finally:
        stop_all(prefill, decode)


def test_abort_while_chunks_stream_keeps_kv_until_the_writes_stopped():
    """A prompt computed in small chunks streams its KV chunk by chunk; aborted after some chunks left, both
    sides end the request with an error, the prefill holds the KV until its writes stopped, and every slot is
    free again on both sides afterwards (the decode's destination too)."""
    prefill = start_prefill(BACKEND, ["--chunked-prefill-size", "64"])
    decode = None
    try:
        decode = start_decode(BACKEND)
        body = with_bootstrap({"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 8}, "rid": "streamed"},
                              prefill)
        with cf.ThreadPoolExecutor(2) as ex:
            fp = ex.submit(_post, prefill.server.base_url + "/generate", body)
            fd = ex.submit(_post, decode.base_url + "/generate", body)
            deadline = time.monotonic() + 120
            while load(prefill.server).get("kv_chunks_streamed", 0) < 2:  # some chunks on their way
                assert time.monotonic() < deadline and not fp.done(), "no chunk was streamed"
                time.sleep(0.05)
            httpx.post(prefill.server.base_url + "/abort_request", json={"rid": "streamed"}, timeout=30)
            rp, rd = fp.result(), fd.result()
        assert rp.status_code == 500 and rd.status_code == 500, (rp.text, rd.text)
        wait_idle_and_free(prefill.server, decode)
        # Both still serve, and a streamed prompt now lands whole and right.
        ok = with_bootstrap({"text": LONG_PROMPT[:800], "sampling_params": {"max_new_tokens": 4}}, prefill)
        rp, rd = pd_post(prefill, decode, "/generate", ok)
        assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
        assert load(prefill.server)["kv_chunks_streamed"] > 2
        wait_idle_and_free(prefill.server, decode)
    finally:
        stop_all(prefill, *(d for d in (decode,) if d is not None))


def test_injected_transfer_failures_fail_cleanly_and_nothing_leaks():
    """PDSERVE_FAULT_TRANSFER_FAIL_P=0.05 on the prefill for 200 requests (SGLang injects 5% too): each failure
    is a clear error to the client, the rest answer, both servers stay up and end with no KV in use."""
    prefill = start_prefill(BACKEND, env={"PDSERVE_FAULT_TRANSFER_FAIL_P": "0.05", "PDSERVE_FAULT_SEED": "7"})
    decode = start_decode(BACKEND)
    try:
        failures_before = pd_failures(prefill.server)[1]
        bodies = [{"text": f"Request {i}: say something short.",
                   "sampling_params": {"max_new_tokens": 4, "temperature": 0}} for i in range(200)]
        with cf.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda b: pd_post(prefill, decode, "/generate", b), bodies))
        answered, errors = 0, []
        for _, rd in results:
            if rd.status_code == 200:
                assert rd.json()["output_ids"], rd.text
                answered += 1
            else:
                errors.append(rd)
        assert answered + len(errors) == 200
        print(f"injected transfer failures: {len(errors)} of 200 requests failed with a clear error, {answered} answered")
        assert 1 <= len(errors) <= 30, [e.text for e in errors[:3]]  # ~10 expected at 5%
        for e in errors:
            assert e.status_code >= 400 and "injected fault" in e.json()["error"]["message"], e.text
        assert pd_failures(prefill.server)[1] - failures_before == len(errors)
        wait_idle_and_free(prefill.server, decode)
        for s in (prefill.server, decode):
            assert httpx.get(s.base_url + "/health", timeout=30).status_code == 200
    finally:
        stop_all(prefill, decode)


def test_kv_checksum_passes_good_transfers_and_fails_corrupted_ones(server):
    """--disaggregation-kv-checksum on both sides; the decode corrupts a byte of half the prompts' landed KV
    (PDSERVE_FAULT_KV_CORRUPT_P=0.5): those fail with an error naming corruption, the others give the unified
    server's output, both servers stay healthy and end with no KV in use."""
    prefill = start_prefill(BACKEND, ["--disaggregation-kv-checksum"])
    decode = start_decode(BACKEND, ["--disaggregation-kv-checksum"],
                          env={"PDSERVE_FAULT_KV_CORRUPT_P": "0.5", "PDSERVE_FAULT_SEED": "1"})
    try:
        prompts = [f"Question {i}: name a colour." for i in range(16)]
        want = {}
        for p in prompts:
            r = httpx.post(server.base_url + "/generate", json=greedy_body(p), timeout=120)
            assert r.status_code == 200, r.text
            want[p] = r.json()["output_ids"]
        corrupted = 0
        for p in prompts:
            _, rd = pd_post(prefill, decode, "/generate", greedy_body(p))
            if rd.status_code == 200:
                assert rd.json()["output_ids"] == want[p]
            else:
                assert rd.status_code >= 400 and "arrived corrupted" in rd.json()["error"]["message"], rd.text
                corrupted += 1
        print(f"KV checksum: {corrupted} of {len(prompts)} corrupted transfers caught, the rest matched unified")
        assert 1 <= corrupted < len(prompts)
        assert pd_failures(decode)[1] >= corrupted
        wait_idle_and_free(prefill.server, decode)
        for s in (prefill.server, decode):
            assert httpx.get(s.base_url + "/health", timeout=30).status_code == 200
    finally:
        stop_all(prefill, decode)
