"""Fault scenarios on a multi-host PD deployment: servers in network namespaces (pdserve/bench/netns.py), the
router in front, a closed-loop streaming load, one fault at a time, and the figures of each: success rate, the
longest pause in which no client got a token, p99 TTFT/ITL of the requests that ran during the fault, and
whether every answer equals an undisturbed run's (greedy). tests/test_multihost.py asserts on them;
benchmarks/faults.py prints them as a table."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx

from pdserve.bench.netns import Host, Network

AUTH_ENV = {"PDSERVE_DISAGGREGATION_AUTH_TOKEN": "faults-harness-secret-0123456789"}
HEARTBEAT_ENV = {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5", "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2"}
PROMPTS = ("Tell me about the history of Rome.", "How do airplanes fly?", "Write a short poem about autumn.",
           "What is a prime number?", "Describe the water cycle.", "Give three tips for learning to code.")
START_TIMEOUT_S = 240.0


@dataclass
class Proc:
    """A server (or the router) process, restartable with the same address and flags."""

    name: str
    module: str
    host: str
    port: int
    args: list[str]
    env: dict[str, str]
    netns: str | None = None
    proc: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", self.module, "--host", self.host, "--port", str(self.port), *self.args]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        fd, self.log_path = tempfile.mkstemp(prefix=f"pdserve-faults-{self.name}-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})

    def wait_ok(self, path: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during startup:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + path, timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class Deployment:
    """nP + nD servers, each in its own namespace (decode hosts joined through a FrameRelay), and a router."""

    def __init__(self, net: Network, num_prefills: int = 2, num_decodes: int = 2, backend: str = "nixl",
                 router_args: tuple[str, ...] = ()) -> None:
        self.net = net
        self.hosts: dict[str, Host] = {}
        self.prefills: list[Proc] = []
        self.decodes: list[Proc] = []
        common = ["--num-threads", "1", "--max-total-tokens", "8192", "--disaggregation-transfer-backend", backend]
        for i in range(num_prefills):
            h = self.hosts[f"p{i}"] = net.add_host(f"p{i}")
            self.prefills.append(Proc(f"p{i}", "pdserve.launch_server", h.ip, 30000, [
                *common, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "8998"],
                dict(AUTH_ENV), h.netns))
        for i in range(num_decodes):
            h = self.hosts[f"d{i}"] = net.add_host(f"d{i}", relay=True)
            self.decodes.append(Proc(f"d{i}", "pdserve.launch_server", h.ip, 30000, [
                *common, "--disaggregation-mode", "decode"], {**AUTH_ENV, **HEARTBEAT_ENV}, h.netns))
        args = ["--pd-disaggregation", "--policy", "round_robin", "--health-check-interval-secs", "0.5",
                "--health-check-timeout-secs", "2", "--health-failure-threshold", "1", "--health-success-threshold",
                "1", "--connect-timeout-secs", "2", "--retry-initial-backoff-ms", "20", *router_args]
        args += [a for p in self.prefills for a in ("--prefill", p.url, "8998")]
        args += [a for d in self.decodes for a in ("--decode", d.url)]
        self.router = Proc("router", "pdserve.launch_router", net.ip, 30000, args, {})
        for p in self.servers:
            p.start()
        with cf.ThreadPoolExecutor(len(self.servers)) as ex:
            list(ex.map(lambda p: p.wait_ok("/health_generate"), self.servers))
        self.router.start()
        self.router.wait_ok("/readiness", 60)

    @property
    def servers(self) -> list[Proc]:
        return self.prefills + self.decodes

    def host_of(self, p: Proc) -> Host:
        return self.hosts[p.name]

    def restart(self, p: Proc) -> None:
        p.stop()
        p.start()
        p.wait_ok("/health_generate")

    def healthy_in_router(self, p: Proc) -> bool:
        workers = httpx.get(self.router.url + "/workers", timeout=10).json()["workers"]
        return any(w["url"] == p.url and w["healthy"] for w in workers)

    def metric(self, name: str) -> float:
        text = httpx.get(self.router.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def close(self) -> None:
        self.router.stop()
        with cf.ThreadPoolExecutor(len(self.servers)) as ex:  # each drains and exits on its own
            list(ex.map(Proc.stop, self.servers))


def greedy_body(prompt: str, num_tokens: int) -> dict:
    return {"text": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": num_tokens, "temperature": 0, "ignore_eos": True}}


@dataclass
class Record:
    prompt: str
    start: float
    end: float = 0.0
    status: int = 0
    text: str = ""
    error: str = ""
    token_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and bool(self.token_times)


def stream_once(url: str, prompt: str, num_tokens: int) -> Record:
    rec = Record(prompt, time.monotonic())
    try:
        with httpx.stream("POST", url + "/generate", json=greedy_body(prompt, num_tokens), timeout=300) as resp:
            rec.status = resp.status_code
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec.error = str(ev["error"].get("message", ev["error"]))[:300]
                    continue
                rec.text = ev.get("text", rec.text)
                rec.token_times.append(time.monotonic())
            if resp.status_code != 200:
                rec.error = resp.read().decode(errors="replace")[:300]
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.monotonic()
    return rec


class Load:
    """`concurrency` clients, each streaming one greedy request after another (closed loop) until stop()."""

    def __init__(self, url: str, concurrency: int = 3, num_tokens: int = 24) -> None:
        self.url, self.num_tokens = url, num_tokens
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._pool = cf.ThreadPoolExecutor(concurrency)
        self._futs = [self._pool.submit(self._client, i) for i in range(concurrency)]

    def _client(self, i: int) -> None:
        k = i
        while not self._stop.is_set():
            self.records.append(stream_once(self.url, PROMPTS[k % len(PROMPTS)], self.num_tokens))
            k += 1

    def stop(self) -> list[Record]:
        self._stop.set()
        for f in self._futs:
            f.result(timeout=600)
        self._pool.shutdown()
        return self.records


@dataclass
class ScenarioResult:
    name: str
    requests: int
    succeeded: int
    unchanged: int  # answers equal to the undisturbed run's
    longest_pause_s: float  # longest time in the fault window in which no client got a token
    p99_ttft_s: float
    p99_itl_s: float
    note: str = ""

    @property
    def success_pct(self) -> float:
        return 100.0 * self.succeeded / max(1, self.requests)


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


def summarize(name: str, records: list[Record], refs: dict[str, str], t_fault: float, t_end: float,
              note: str = "") -> ScenarioResult:
    """Figures of the requests that overlapped [t_fault, t_end]."""
    window = [r for r in records if r.end >= t_fault and r.start <= t_end]
    times = sorted(t for r in records for t in r.token_times if t_fault <= t <= t_end)
    edges = [t_fault, *times, t_end]
    pause = max((b - a for a, b in zip(edges, edges[1:])), default=t_end - t_fault)
    ttfts = [r.token_times[0] - r.start for r in window if r.token_times]
    itls = [b - a for r in window for a, b in zip(r.token_times, r.token_times[1:])]
    return ScenarioResult(name, len(window), sum(r.ok for r in window),
                          sum(r.ok and r.text == refs.get(r.prompt) for r in window), pause, _p99(ttfts), _p99(itls),
                          note)


def references(dep: Deployment, num_tokens: int) -> dict[str, str]:
    return {p: stream_once(dep.router.url, p, num_tokens).text for p in PROMPTS}


def run_with_fault(dep: Deployment, name: str, refs: dict[str, str], inject, heal, fault_s: float,
                   settle_s: float = 4.0, concurrency: int = 3, num_tokens: int = 24) -> ScenarioResult:
    """Load for 2 s, inject(), wait fault_s, heal() (may be None), load settle_s more; figures of the window."""
    load = Load(dep.router.url, concurrency, num_tokens)
    time.sleep(2.0)
    t_fault = time.monotonic()
    note = inject() or ""
    time.sleep(fault_s)
    if heal is not None:
        note = heal() or note
    time.sleep(settle_s)
    t_end = time.monotonic()
    return summarize(name, load.stop(), refs, t_fault, t_end, note)


def format_results(results: list[ScenarioResult]) -> str:
    head = (f"{'scenario':<44} {'requests':>8} {'success':>8} {'unchanged':>9} {'pause s':>8} {'p99 TTFT':>9} "
            f"{'p99 ITL':>8}  note")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<44} {r.requests:>8} {r.success_pct:>7.1f}% {r.unchanged:>9} {r.longest_pause_s:>8.2f} "
                     f"{r.p99_ttft_s:>9.2f} {r.p99_itl_s:>8.3f}  {r.note}")
    return "\n".join(lines)


# ---- the scenarios (each leaves the deployment whole again) ----------------------------------------------------
def delay_and_loss(dep: Deployment, refs: dict[str, str]) -> ScenarioResult:
    relays = [dep.host_of(d).relay for d in dep.decodes]

    def inject() -> str:
        for r in relays:
            r.set(delay_s=0.020, loss=0.01)
        return ""

    def heal() -> str:
        for r in relays:
            r.set()
        return f"{sum(r.dropped for r in relays)} of {sum(r.forwarded + r.dropped for r in relays)} frames dropped"

    return run_with_fault(dep, "20 ms delay + 1% loss on every decode link", refs, inject, heal, 10.0)


def kill_prefill(dep: Deployment, refs: dict[str, str]) -> ScenarioResult:
    victim = dep.prefills[-1]

    def heal() -> str:
        t0 = time.monotonic()
        dep.restart(victim)
        return f"restarted in {time.monotonic() - t0:.0f} s"

    return run_with_fault(dep, "kill -9 one of two prefills", refs, lambda: victim.signal(signal.SIGKILL), heal, 5.0)


def partition_prefill(dep: Deployment, refs: dict[str, str]) -> ScenarioResult:
    victim = dep.prefills[0]
    host = dep.host_of(victim)

    def heal() -> str:
        dep.net.link_up(host)
        t0 = time.monotonic()
        while not dep.healthy_in_router(victim):
            if time.monotonic() - t0 > 60:
                return "did not rejoin within 60 s"
            time.sleep(0.1)
        return f"rejoined {time.monotonic() - t0:.1f} s after the link returned"

    return run_with_fault(dep, "partition a prefill (its link down) for 10 s", refs,
                          lambda: dep.net.link_down(host), heal, 10.0)


def stop_decode(dep: Deployment, refs: dict[str, str]) -> ScenarioResult:
    victim = dep.decodes[-1]
    migrations = dep.metric("pdserve_router_migrations_total")

    def heal() -> str:
        victim.signal(signal.SIGCONT)
        return f"{dep.metric('pdserve_router_migrations_total') - migrations:.0f} streams migrated"

    return run_with_fault(dep, "SIGSTOP one of two decodes for 20 s", refs, lambda: victim.signal(signal.SIGSTOP),
                          heal, 20.0)


def kill_decode(dep: Deployment, refs: dict[str, str]) -> ScenarioResult:
    victim = dep.decodes[-1]
    migrations = dep.metric("pdserve_router_migrations_total")

    def heal() -> str:
        moved = dep.metric("pdserve_router_migrations_total") - migrations
        dep.restart(victim)
        return f"{moved:.0f} streams migrated"

    return run_with_fault(dep, "kill -9 one of two decodes", refs, lambda: victim.signal(signal.SIGKILL), heal, 5.0)


SCENARIOS = (delay_and_loss, kill_prefill, partition_prefill, stop_decode, kill_decode)
ROUTER_ARGS = ("--stream-stall-timeout-secs", "3")


def kill_every_prefill(dep: Deployment, refs: dict[str, str]) -> ScenarioResult:
    """No prefill left: the decodes prefill themselves (decode-only fallback) until the prefills are back."""
    fallbacks = dep.metric("pdserve_router_decode_fallbacks_total")

    def inject() -> str:
        for p in dep.prefills:
            p.signal(signal.SIGKILL)
        return ""

    def heal() -> str:
        moved = dep.metric("pdserve_router_decode_fallbacks_total") - fallbacks
        with cf.ThreadPoolExecutor(len(dep.prefills)) as ex:
            list(ex.map(dep.restart, dep.prefills))
        return f"{moved:.0f} requests served by a decode alone"

    return run_with_fault(dep, "kill -9 every prefill (no replica left)", refs, inject, heal, 10.0)


BENCH_SCENARIOS = (*SCENARIOS, kill_every_prefill)  # the last one restarts every prefill: benchmarks only
