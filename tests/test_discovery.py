"""Membership through etcd: a real `etcd` (the Debian package etcd-server), real servers that register with
`--discovery`, a real router that watches it. Workers join and leave without restarting the router; a killed
worker leaves within its lease TTL; a drained one leaves at once; etcd restarted under load changes nothing."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from pdserve.discovery import DEFAULT_PREFIX, DiscoveryConfig, WorkerRecord, decode_record, record_key
from tests.conftest import free_port
from tests.pd_helpers import start_decode, start_prefill, stop_all
from tests.test_router import counters, router

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(ETCD is None, reason="no `etcd` binary on PATH (`make setup` installs the Debian "
                                                     "package etcd-server with apt-get)")
BACKEND = os.environ.get("PDSERVE_TEST_FAILURE_BACKEND", "nixl")


class Etcd:
    def __init__(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="pdserve-etcd-")
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        self.proc = subprocess.Popen(
            [ETCD, "--name", "t", "--data-dir", self.data_dir, "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(client + "/health", timeout=2).json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@contextmanager
def etcd_server() -> Iterator[Etcd]:
    e = Etcd()
    e.start()
    try:
        yield e
    finally:
        e.stop()
        shutil.rmtree(e.data_dir, ignore_errors=True)


def test_discovery_url_and_records():
    assert DiscoveryConfig.parse("etcd://10.0.0.5:2379") == DiscoveryConfig("http://10.0.0.5:2379", DEFAULT_PREFIX)
    assert DiscoveryConfig.parse("etcd://h/team/a") == DiscoveryConfig("http://h:2379", "/team/a/")
    for bad in ("http://h:2379", "etcd://", "etcd://h:99999"):
        with pytest.raises(ValueError):
            DiscoveryConfig.parse(bad)
    rec = WorkerRecord("http://10.0.0.7:30000", "prefill", 8998, "m")
    assert record_key("/p/", rec) == "/p/prefill/10.0.0.7:30000"
    assert decode_record(b'{"url": "http://h:1", "role": "decode"}') == WorkerRecord("http://h:1", "decode")
    for bad in (b"not json", b'{"url": 1, "role": "decode"}', b'{"url": "http://h:1", "role": "boss"}', b"[]"):
        assert decode_record(bad) is None


def _workers(r) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(r.base_url + "/workers", timeout=10).json()["workers"]}


def _wait(what: str, cond, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)
    return time.monotonic() - t0


def _greedy(prompt: str) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


@needs_etcd
def test_workers_join_and_leave_through_etcd():
    with etcd_server() as etcd:
        disc = ["--discovery", etcd.url]
        args = ["--pd-disaggregation", *disc, "--policy", "round_robin", "--health-check-interval-secs", "0.5"]
        with router(args, ready=False) as r:
            assert httpx.get(r.base_url + "/readiness", timeout=10).status_code == 503  # nobody registered yet
            with cf.ThreadPoolExecutor(2) as ex:
                fp = ex.submit(start_prefill, BACKEND, [*disc, "--discovery-ttl", "30"])
                fd = ex.submit(start_decode, BACKEND, [*disc, "--discovery-ttl", "2"])
                prefill, decode = fp.result(), fd.result()
            servers = [prefill, decode]
            try:
                _wait("the pair did not join", lambda: httpx.get(r.base_url + "/readiness", timeout=10)
                      .status_code == 200)
                assert {(w["role"], w["bootstrap_port"]) for w in _workers(r).values()} == {
                    ("prefill", prefill.bootstrap_port), ("decode", None)}
                ref = httpx.post(r.base_url + "/generate", json=_greedy("The capital of France is"), timeout=120)
                assert ref.status_code == 200, ref.text

                # A second decode joins a running router and gets traffic.
                decode2 = start_decode(BACKEND, [*disc, "--discovery-ttl", "2"])
                servers.append(decode2)
                _wait("the second decode did not join", lambda: _workers(r).get(decode2.base_url, {})
                      .get("healthy", False))
                for _ in range(4):
                    resp = httpx.post(r.base_url + "/generate", json=_greedy("The capital of France is"), timeout=120)
                    assert resp.status_code == 200 and resp.json()["output_ids"] == ref.json()["output_ids"]
                assert counters(r)[("decode", decode2.base_url)] >= 1

                # kill -9: it leaves when its lease (2 s) expires.
                os.killpg(decode2.proc.pid, signal.SIGKILL)
                left_after = _wait("the killed decode did not leave", lambda: decode2.base_url not in _workers(r), 30)

                # etcd restarted under load: serving goes on with the last known membership.
                stop, statuses = threading.Event(), []

                def load() -> None:
                    while not stop.is_set():
                        statuses.append(httpx.post(r.base_url + "/generate", json=_greedy("Hello"),
                                                   timeout=120).status_code)

                with cf.ThreadPoolExecutor(1) as ex:
                    loader = ex.submit(load)
                    time.sleep(0.5)
                    etcd.stop()
                    time.sleep(3.0)  # etcd away: longer than the decode's lease TTL
                    assert set(_workers(r)) == {prefill.server.base_url, decode.base_url}
                    etcd.start()
                    time.sleep(3.0)
                    stop.set()
                    loader.result(timeout=120)
                assert statuses and set(statuses) == {200}, statuses
                assert set(_workers(r)) == {prefill.server.base_url, decode.base_url}

                # A drained server withdraws its record at once (its lease, 30 s, has not expired).
                os.killpg(prefill.server.proc.pid, signal.SIGTERM)
                drained_after = _wait("the drained prefill did not leave",
                                      lambda: prefill.server.base_url not in _workers(r), 20)
                assert drained_after < 10
                print(f"\ndiscovery: a killed decode left the router after {left_after:.1f} s (lease 2 s); "
                      f"{len(statuses)} requests while etcd restarted, all 200; a drained prefill left after "
                      f"{drained_after:.2f} s")
            finally:
                stop_all(*servers)
