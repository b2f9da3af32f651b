"""`pdserve up`: a router, N prefill and M decode servers on this machine, started, watched and stopped as one.

Each server gets free ports on the host, its own log file and its own CPU cores (prefill and decode on
separate cores by default). Ctrl-C or SIGTERM stops every child; no process is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from pdserve.config import SCHEDULE_POLICIES

READY_TIMEOUT_S = 600.0
# One step of a 128-token chunk on one core takes ~0.35 s here; a 1024-token prompt prefills as fast in 128-token
# chunks as in 512 (342 vs 331 tok/s, 1 thread, avx512; 64: 271 tok/s), and a short prompt that arrives behind
# a long one waits about one layer slice of such a step (spf, --prefill-layer-slices; docs/benchmarks.md, issue 18).
CHUNKED_PREFILL_SIZE = 128


@dataclass
class Child:
    name: str
    cmd: list[str]
    url: str
    ready_path: str
    log_path: str
    cpus: list[int] = field(default_factory=list)  # the process's affinity (empty: inherit)
    engine_cpus: list[int] = field(default_factory=list)  # its engine process's, when pinned apart (--engine-cpus)
    proc: subprocess.Popen | None = None
    ready: bool = False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_cpus(cpus: list[int], num_prefill: int, num_decode: int) -> tuple[list[list[int]], list[list[int]]]:
    """Give prefill servers the first half of the cores and decode servers the second (shared if too few)."""
    n = len(cpus)
    if n == 1:
        return [cpus] * num_prefill, [cpus] * num_decode
    half = max(1, n // 2)
    pre, dec = cpus[:half], cpus[half:]

    def share(pool: list[int], k: int) -> list[list[int]]:
        if k <= len(pool):
            per = len(pool) // k
            return [pool[i * per:(i + 1) * per] for i in range(k)]
        return [[pool[i % len(pool)]] for i in range(k)]

    return share(pre, num_prefill), share(dec, num_decode)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def plan(args: argparse.Namespace, log_dir: str) -> list[Child]:
    py = sys.executable
    common = ["--host", args.host, "--max-total-tokens", str(args.max_total_tokens), "--page-size",
              str(args.page_size)]
    if args.model_path:
        common += ["--model-path", args.model_path]
    cpus = sorted(os.sched_getaffinity(0))
    children: list[Child] = []
    prefill_flags = ["--chunked-prefill-size", str(args.chunked_prefill_size),  # every server that prefills
             "--schedule-policy", args.schedule_policy, "--prefill-layer-slices", str(args.prefill_layer_slices)]
    service_cpus: list[int] = []  # router and decode fronts, when decode engines have cores of their own
    if "kv_aware" in (args.policy, args.prefill_policy):  # the servers that prefill publish their cache's blocks
        prefill_flags += ["--kv-events-config", ""]  # the endpoint is set per server below

    def server(name: str, extra: list[str], cpu: list[int], tp: int = 1, dp: int = 1) -> Child:
        port = free_port(args.host)
        threads = max(1, len(cpu) // (tp * dp))  # per rank
        cmd = [py, "-m", "pdserve.launch_server", "--port", str(port), "--num-threads", str(threads), *common, *extra]
        if "--kv-events-config" in cmd:
            at = cmd.index("--kv-events-config") + 1
            cmd[at] = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{free_port(args.host)}"})
        if tp > 1:
            cmd += ["--tp-size", str(tp)]
        if dp > 1:
            cmd += ["--dp-size", str(dp)]
        return Child(name, cmd, _url(args.host, port), "/health_generate", os.path.join(log_dir, f"{name}.log"), cpu)

    if args.unified:
        children.append(server("unified-0", prefill_flags, cpus))
        router_flags = ["--worker-urls", children[0].url]
    else:
        pre_cpus, dec_cpus = split_cpus(cpus, args.prefill, args.decode)
        router_flags = ["--pd-disaggregation"]
        for i in range(args.prefill):
            bp = free_port(args.host)
            c = server(f"prefill-{i}", ["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend",
                                        args.transfer_backend, "--disaggregation-bootstrap-port", str(bp), *prefill_flags],
                       pre_cpus[i],
                       args.prefill_tp, args.prefill_dp or args.dp)
            children.append(c)
            router_flags += ["--prefill", c.url, str(bp)]
        # Decode engines run on the decode cores with no HTTP front or router beside them: the fronts and the
        # router run on the prefill cores (one waking up on a decode core would delay a decode step, i.e. every
        # stream's ITL). Decode engines share a core only when there are more of them than decode cores.
        pre_set, dec_set = set().union(*pre_cpus), set().union(*dec_cpus)
        if not pre_set & dec_set:
            service_cpus = sorted(pre_set)
        for i in range(args.decode):
            extra = ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", args.transfer_backend]
            c = server(f"decode-{i}", extra, dec_cpus[i], args.decode_tp, args.decode_dp or args.dp)
            if service_cpus:
                c.cmd += ["--engine-cpus", ",".join(map(str, dec_cpus[i]))]
                c.cpus, c.engine_cpus = service_cpus, dec_cpus[i]
            children.append(c)
            router_flags += ["--decode", c.url]
    router_cmd = [py, "-m", "pdserve.launch_router", *router_flags, "--host", args.host, "--port", str(args.port)]
    if args.policy:
        router_cmd += ["--policy", args.policy]
    if args.prefill_policy and not args.unified:
        router_cmd += ["--prefill-policy", args.prefill_policy]
    if not args.unified:
        router_cmd += ["--dispatch", args.dispatch]
    if args.model_path and "kv_aware" in (args.policy, args.prefill_policy):
        router_cmd += ["--tokenizer-path", args.model_path]
    children.append(Child("router", router_cmd, _url(args.host, args.port), "/readiness",
                          os.path.join(log_dir, "router.log"), service_cpus))
    return children


class Deployment:
    def __init__(self, children: list[Child]):
        self.children = children
        self._stopping = False

    def start(self) -> None:
        # One secret per deployment, in the environment (not on command lines, which `ps` shows): it signs the
        # servers' control frames and authorises bootstrap writes (config.py auth_token).
        env = dict(os.environ)
        if not env.get("PDSERVE_DISAGGREGATION_AUTH_TOKEN"):
            env["PDSERVE_DISAGGREGATION_AUTH_TOKEN"] = secrets.token_urlsafe(32)
        for c in self.children:
            log = open(c.log_path, "w")
            cpus = set(c.cpus)
            preexec = (lambda cpus=cpus: os.sched_setaffinity(0, cpus)) if cpus else None
            c.proc = subprocess.Popen(c.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=preexec, env=env)
            log.close()

    def start_ready(self, timeout: float = READY_TIMEOUT_S) -> Deployment:
        """start(), then wait_ready(); stopped again if it does not become ready."""
        self.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc is not None and c.proc.poll() is not None), None)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        t0 = time.monotonic()
        while not all(c.ready for c in self.children):
            dead = self.dead_child()
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode}; log tail:\n{_tail(dead.log_path)}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"not ready after {timeout:.0f} s: "
                                   + ", ".join(c.name for c in self.children if not c.ready))
            for c in self.children:
                if not c.ready:
                    c.ready = _http_ok(c.url + c.ready_path)
            status = "  ".join(f"{c.name}:{'ready' if c.ready else 'loading'}" for c in self.children)
            print(f"\r[{time.monotonic() - t0:5.0f} s] {status}", end="", flush=True)
            time.sleep(0.5)
        print()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for c in reversed(self.children):  # router first, then servers
            _signal_group(c, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(c, signal.SIGKILL)
            c.proc.wait()


def _signal_group(c: Child, sig: int) -> None:
    if c.proc is not None:
        try:
            os.killpg(c.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status == 200
    except OSError:
        return False


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def start_deployment(argv: list[str], log_dir: str) -> Deployment:
    """`pdserve up` with these flags, started and ready (stopped again if it fails to start): for benchmarks."""
    ap = argparse.ArgumentParser()
    add_up_args(ap)
    os.makedirs(log_dir, exist_ok=True)
    return Deployment(plan(ap.parse_args(argv), log_dir)).start_ready()


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill servers")
    p.add_argument("--decode", type=int, default=1, help="number of decode servers")
    p.add_argument("--transfer-backend", default="nixl", choices=["nixl", "mooncake", "fake"])
    p.add_argument("--unified", action="store_true", help="one unified server behind the router instead of PD")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="the router's port (the endpoint)")
    p.add_argument("--policy", default=None,
                   help="router policy (random, round_robin, power_of_two, cache_aware, kv_aware)")
    p.add_argument("--prefill-policy", default=None,
                   help="router policy for the prefills (PD); kv_aware turns on their KV events (--kv-events-config)")
    p.add_argument("--dispatch", default="parallel", choices=("parallel", "prefill-first", "decode-first"),
                   help="how the router drives a prefill/decode pair (pdserve route --dispatch)")
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor parallel ranks of each prefill server")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor parallel ranks of each decode server")
    p.add_argument("--dp", type=int, default=1, help="data parallel replicas of each PD server")
    p.add_argument("--prefill-dp", type=int, default=None, help="overrides --dp for prefill servers")
    p.add_argument("--decode-dp", type=int, default=None, help="overrides --dp for decode servers")
    p.add_argument("--page-size", type=int, default=1, help="KV page size in tokens (prefill and decode agree)")
    p.add_argument("--chunked-prefill-size", type=int, default=CHUNKED_PREFILL_SIZE,
                   help="tokens of one prompt per step on every server that prefills (unified and prefill); the "
                        "most a short prompt waits behind a long one is about one such step")
    p.add_argument("--schedule-policy", default="spf", choices=SCHEDULE_POLICIES,
                   help="of every server that prefills (spf: short prompts go before long ones' chunks)")
    p.add_argument("--prefill-layer-slices", type=int, default=3,
                   help="of every server that prefills (with spf: a short prompt waits one slice of a step)")
    p.add_argument("--log-dir", default=None, help="default: ./logs/up-<time>")


def run_up(args: argparse.Namespace) -> int:
    if args.prefill < 1 or args.decode < 1:
        raise SystemExit("--prefill and --decode must be >= 1")
    log_dir = args.log_dir or os.path.join("logs", time.strftime("up-%Y%m%d-%H%M%S"))
    os.makedirs(log_dir, exist_ok=True)
    dep = Deployment(plan(args, log_dir))

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        dep.start()
        print(f"pdserve up: logs in {log_dir}/ (one per process)")
        for c in dep.children:
            cpu = (f" cpus={c.cpus}" if c.cpus else "") + (f" engine cpus={c.engine_cpus}" if c.engine_cpus else "")
            print(f"  {c.name:<10} {c.url}{cpu}")
        dep.wait_ready()
        router = dep.children[-1]
        print(f"\nReady. OpenAI-compatible endpoint: {router.url}/v1\n\nTry:\n"
              f"  curl {router.url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello! Who are you?\"}}], "
              f"\"max_tokens\": 64}}'\n\nCtrl-C stops everything.", flush=True)
        while True:
            dead = dep.dead_child()
            if dead is not None:
                print(f"\n{dead.name} exited with code {dead.proc.returncode}; stopping. Log tail:\n{_tail(dead.log_path)}")
                code = 1
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    except RuntimeError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dep.stop()
    print("all processes stopped.")
    return code
