"""Stream migration through the router: a decode killed (kill -9) or stopped (SIGSTOP) mid-stream; the router
re-issues each of its streams with the tokens already sent (`resume_output_ids`) to the other decode and continues
the same client stream: no token missing or repeated, greedy output identical to an undisturbed run."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.pd_helpers import start_decode, start_prefill, stop_all
from tests.test_router import router, scalar

BACKEND = os.environ.get("PDSERVE_TEST_FAILURE_BACKEND", "nixl")
NUM_TOKENS = 96
PROMPTS = ["Tell me a long story about a dragon.", "Explain how rain forms.", "Write a poem about the sea.",
           "Describe a busy market."]


def _body(kind: str, prompt: str) -> dict:
    if kind == "generate":
        return {"text": prompt, "sampling_params": {"max_new_tokens": NUM_TOKENS, "temperature": 0,
                                                    "ignore_eos": True}}
    common = {"model": "m", "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True}
    if kind == "chat":
        return {**common, "messages": [{"role": "user", "content": prompt}]}
    return {**common, "prompt": prompt}


_PATHS = {"generate": "/generate", "chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _reference(url: str, kind: str, prompt: str) -> str:
    body = httpx.post(url + _PATHS[kind], json=_body(kind, prompt), timeout=180).json()
    if kind == "generate":
        return body["text"]
    choice = body["choices"][0]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


class Stream:
    """One client stream: its text as the client assembles it, the time of each event, and any error event."""

    def __init__(self, kind: str, prompt: str) -> None:
        self.kind, self.prompt = kind, prompt
        self.text, self.times, self.errors, self.status, self.done = "", [], [], 0, False
        self.started = threading.Event()
        self.ids_seen = False

    def run(self, url: str) -> Stream:
        with httpx.stream("POST", url + _PATHS[self.kind], json={**_body(self.kind, self.prompt), "stream": True},
                          timeout=240) as resp:
            self.status = resp.status_code
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                self.times.append(time.monotonic())
                if line.strip() == "data: [DONE]":
                    self.done = True
                    continue
                ev = json.loads(line[5:])
                if "error" in ev:
                    self.errors.append(ev)
                elif self.kind == "generate":
                    self.text = ev["text"]  # cumulative
                elif ev.get("choices"):
                    c = ev["choices"][0]
                    self.ids_seen = self.ids_seen or "token_ids" in c
                    self.text += (c.get("delta", {}).get("content") or "") if self.kind == "chat" else c["text"]
                self.started.set()
        return self

    def max_gap_s(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)


@pytest.fixture(scope="module")
def pair():
    with cf.ThreadPoolExecutor(3) as ex:
        fp = ex.submit(start_prefill, BACKEND)
        fds = [ex.submit(start_decode, BACKEND) for _ in range(2)]
        prefill, decodes = fp.result(), [f.result() for f in fds]
    yield prefill, decodes
    stop_all(prefill, *decodes)


def _router_args(prefill, decodes, *extra: str) -> list[str]:
    args = ["--pd-disaggregation", "--prefill", prefill.server.base_url, str(prefill.bootstrap_port),
            "--policy", "round_robin", "--health-check-interval-secs", "0.5", "--health-failure-threshold", "1",
            "--retry-initial-backoff-ms", "20", *extra]
    for d in decodes:
        args += ["--decode", d.base_url]
    return args


def _run_streams(r, kinds: list[str]) -> tuple[list[Stream], list[cf.Future], cf.ThreadPoolExecutor]:
    streams = [Stream(kind, PROMPTS[i % len(PROMPTS)]) for i, kind in enumerate(kinds)]
    ex = cf.ThreadPoolExecutor(len(streams))
    futs = [ex.submit(s.run, r.base_url) for s in streams]
    for s in streams:
        assert s.started.wait(180), "streams did not start"
    return streams, futs, ex


def _check_identical(streams: list[Stream], refs: dict[tuple[str, str], str]) -> None:
    for s in streams:
        assert s.status == 200 and s.done and not s.errors, (s.kind, s.errors)
        assert s.text == refs[(s.kind, s.prompt)], (s.kind, s.prompt, s.text, refs[(s.kind, s.prompt)])
        assert not s.ids_seen  # the router asked for token ids on the client's behalf and removed them


def test_kill_one_of_two_decodes_mid_stream_migrates_every_stream(pair):
    prefill, decodes = pair
    kinds = ["generate", "chat", "completions", "generate", "chat", "completions"]
    with router(_router_args(prefill, decodes)) as r:
        refs = {(k, PROMPTS[i % len(PROMPTS)]): _reference(r.base_url, k, PROMPTS[i % len(PROMPTS)])
                for i, k in enumerate(kinds)}
        streams, futs, ex = _run_streams(r, kinds)
        time.sleep(0.5)
        t_kill = time.monotonic()
        os.killpg(decodes[1].proc.pid, signal.SIGKILL)
        with ex:
            for f in futs:
                f.result(timeout=240)
        migrated = scalar(r, "pdserve_router_migrations_total")
        gaps = [s.max_gap_s() for s in streams if s.times[-1] > t_kill]
        print(f"\nkill -9 of one of two decodes: {len(streams)} streams, {migrated:.0f} migrated, all complete and "
              f"identical to an undisturbed run; longest pause a client saw {max(gaps):.2f} s")
        _check_identical(streams, refs)
        assert migrated >= 1  # round robin put streams on the killed decode
        assert max(gaps) < 5.0  # recovery
    decodes[1] = start_decode(BACKEND)  # for the next test


def _engine_pid(server) -> int:
    """The engine process of a server (its front's child started by multiprocessing's spawn)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return int(child)
    raise AssertionError(f"no engine process under {pid}")


def test_dead_engine_behind_a_live_front_migrates_its_streams(pair):
    """The engine process of a decode dies while its HTTP front still answers: the front fails the streams
    (an error event, or the connection drops as it exits); the router continues them on the other decode."""
    prefill, decodes = pair
    kinds = ["generate", "chat", "completions", "generate"]
    with router(_router_args(prefill, decodes)) as r:
        refs = {(k, PROMPTS[i % len(PROMPTS)]): _reference(r.base_url, k, PROMPTS[i % len(PROMPTS)])
                for i, k in enumerate(kinds)}
        streams, futs, ex = _run_streams(r, kinds)
        os.kill(_engine_pid(decodes[1]), signal.SIGKILL)
        with ex:
            for f in futs:
                f.result(timeout=240)
        _check_identical(streams, refs)
        assert scalar(r, "pdserve_router_migrations_total") >= 1
    decodes[1].proc.wait(timeout=60)  # the front follows its engine out
    decodes[1] = start_decode(BACKEND)


def test_sigstopped_decode_streams_migrate_and_it_rejoins(pair):
    prefill, decodes = pair
    kinds = ["generate", "chat", "completions", "generate"]
    with router(_router_args(prefill, decodes, "--stream-stall-timeout-secs", "3")) as r:
        refs = {(k, PROMPTS[i % len(PROMPTS)]): _reference(r.base_url, k, PROMPTS[i % len(PROMPTS)])
                for i, k in enumerate(kinds)}
        streams, futs, ex = _run_streams(r, kinds)
        victim = decodes[1]
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            with ex:
                for f in futs:
                    f.result(timeout=240)
            finished_after = time.monotonic() - t_stop
            migrated = scalar(r, "pdserve_router_migrations_total")
            _check_identical(streams, refs)
            assert migrated >= 1
            time.sleep(max(0.0, 20.0 - (time.monotonic() - t_stop)))  # stopped for 20 s in all
        finally:
            os.killpg(victim.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while not next(w["healthy"] for w in httpx.get(r.base_url + "/workers", timeout=10).json()["workers"]
                       if w["url"] == victim.base_url):
            assert time.monotonic() < deadline, "the decode did not rejoin after SIGCONT"
            time.sleep(0.2)
        rejoined = time.monotonic() - t_stop
        for p in PROMPTS:  # round robin: half of these land on the decode that was stopped
            resp = httpx.post(r.base_url + "/generate", json=_body("generate", p), timeout=180)
            assert resp.status_code == 200 and resp.json()["text"] == _reference(r.base_url, "generate", p)
        load = httpx.get(victim.base_url + "/get_load", timeout=10).json()[0]
        assert load["num_reqs"] == 0  # the streams it held were aborted when the router let go of them
        print(f"\nSIGSTOP of a decode for 20 s: {migrated:.0f} streams migrated (stall timeout 3 s), all done "
              f"{finished_after:.1f} s after the stop; healthy again {rejoined:.1f} s after it")
