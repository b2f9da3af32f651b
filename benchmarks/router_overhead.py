"""Added latency and throughput of the router in PD mode, against sending to the workers directly.

Three workloads, each direct and through every router under test:
  models   GET /v1/models (cheap; one worker answers)
  stub     POST /generate to instant stub workers (no engine: only HTTP and the router remain)
  gen1     POST /generate with max_new_tokens=1 to real prefill + decode servers (fake transfer backend)
"Direct" for /generate is what a PD router does itself: the same body, with bootstrap fields, sent to the
prefill and the decode at once, waiting for both. Latency: sequential requests (p50, p99). Throughput: requests/s
with --concurrency clients.

Routers: pdserve (`python -m pdserve.launch_router`) and, when installed, SGLang's `smg` (pip install smg).

    .venv/bin/python benchmarks/router_overhead.py                # starts 1 prefill + 1 decode + stubs itself
    .venv/bin/python benchmarks/router_overhead.py --prefill http://127.0.0.1:P --bootstrap-port B \
        --decode http://127.0.0.1:D                               # reuse running servers
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import orjson

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- stub worker (a subprocess: `router_overhead.py --stub-worker PORT`) -----------------------------------
def run_stub(port: int) -> None:
    from aiohttp import web

    async def generate(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        out = {"text": "x", "output_ids": [1], "meta_info": {"id": "stub", "finish_reason": {"type": "length"},
                                                             "prompt_tokens": 4, "completion_tokens": 1}}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: " + orjson.dumps(out) + b"\n\ndata: [DONE]\n\n")
            return resp
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    def static(obj: object):
        data = orjson.dumps(obj)

        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=data, content_type="application/json")
        return handler

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", static({}))
    app.router.add_get("/health_generate", static({}))
    app.router.add_get("/get_load", static([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]))
    app.router.add_get("/v1/models", static({"object": "list", "data": [{"id": "stub", "object": "model"}]}))
    info = {"model_path": "stub", "served_model_name": "stub", "is_generation": True, "tokenizer_path": None}
    app.router.add_get("/get_model_info", static(info))
    app.router.add_get("/model_info", static(info))
    app.router.add_get("/get_server_info", static(info))
    app.router.add_get("/server_info", static(info))
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---- processes -------------------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                  env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


async def wait_ok(url: str, proc: Proc | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s" + (f":\n{proc.tail()}" if proc else ""))


def start_real(backend: str) -> tuple[list[Proc], str, int, str]:
    pp, bp, dp = free_port(), free_port(), free_port()
    common = ["--host", "127.0.0.1", "--num-threads", "1", "--max-total-tokens", "8192",
              "--disaggregation-transfer-backend", backend]
    p = Proc("prefill", [PY, "-m", "pdserve.launch_server", "--port", str(pp), "--disaggregation-mode", "prefill",
                         "--disaggregation-bootstrap-port", str(bp), *common])
    d = Proc("decode", [PY, "-m", "pdserve.launch_server", "--port", str(dp), "--disaggregation-mode", "decode",
                        *common])
    return [p, d], f"http://127.0.0.1:{pp}", bp, f"http://127.0.0.1:{dp}"


def router_cmd(kind: str, port: int, prefill: str, bport: int, decode: str, policy: str,
               workers: bool = True) -> list[str] | None:
    if kind == "pdserve":
        return [PY, "-m", "pdserve.launch_router", "--pd-disaggregation", "--prefill", prefill, str(bport),
                "--decode", decode, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--log-level", "warning"]
    smg = shutil.which("smg") or os.path.join(os.path.dirname(PY), "smg")
    if not os.path.exists(smg):
        return None
    listed = ["--prefill", prefill, str(bport), "--decode", decode] if workers else []
    return [smg, "launch", "--pd-disaggregation", *listed, "--host", "127.0.0.1", "--port", str(port),
            "--policy", policy, "--disable-tokenizer-autoload", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port()), "--log-level", "warn", "--shutdown-grace-period-secs", "1"]


async def probe_generate(base: str) -> tuple[int, str]:
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, (await r.text())[:300]


async def smg_cli_check(real: tuple[str, int, str], policy: str, procs: list[Proc]) -> None:
    """What `smg launch --pd-disaggregation --prefill P B --decode D` does with pdserve workers, as documented."""
    port = free_port()
    proc = Proc("smg-cli", router_cmd("smg", port, *real, policy))  # type: ignore[arg-type]
    procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ok(base + "/readiness", proc, 60)
        status, text = await probe_generate(base)
        async with aiohttp.ClientSession() as s, s.get(base + "/workers") as r:
            kinds = sorted({w.get("runtime_type") for w in (await r.json()).get("workers", [])})
        print(f"[smg] CLI-registered workers detected as runtime {kinds}; PD /generate -> {status} {text}")
    except RuntimeError as e:
        print(f"[smg] CLI launch failed: {e}")
    finally:
        proc.stop()


async def start_router(kind: str, p: str, b: int, d: str, policy: str, procs: list[Proc],
                       env: dict | None = None) -> str:
    """pdserve: as on its command line. smg: started empty, workers registered through POST /workers with
    runtime_type=sglang (its CLI registration takes pdserve for vLLM, see smg_cli_check)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if kind == "pdserve":
        proc = Proc(f"pdserve-{port}", router_cmd("pdserve", port, p, b, d, policy), env)  # type: ignore[arg-type]
        procs.append(proc)
        await wait_ok(base + "/readiness", proc, 60)
        return base
    proc = Proc(f"smg-{port}", router_cmd("smg", port, p, b, d, policy, workers=False))  # type: ignore[arg-type]
    procs.append(proc)
    await wait_ok(base + "/health", proc, 60)
    async with aiohttp.ClientSession() as s:
        for body in ({"url": p, "worker_type": "prefill", "bootstrap_port": b, "runtime_type": "sglang"},
                     {"url": d, "worker_type": "decode", "runtime_type": "sglang"}):
            async with s.post(base + "/workers", json=body) as r:
                if r.status >= 300:
                    raise RuntimeError(f"smg POST /workers -> {r.status} {await r.text()}")
    await wait_ok(base + "/readiness", proc, 60)
    status, text = await probe_generate(base)
    if status != 200:
        raise RuntimeError(f"smg /generate -> {status} {text}")
    return base


# ---- load ------------------------------------------------------------------------------------------------
class Target:
    """How one request of a workload is sent: through a router, or directly to both workers."""

    def __init__(self, session: aiohttp.ClientSession, workload: str, router: str | None, prefill: str,
                 bport: int, decode: str) -> None:
        self.s, self.workload, self.router = session, workload, router
        self.prefill, self.bport, self.decode = prefill, bport, decode
        self.body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}

    async def _post(self, url: str, data: bytes) -> None:
        async with self.s.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}: {r.status}")

    async def one(self) -> None:
        if self.workload == "models":
            url = (self.router or self.decode) + "/v1/models"
            async with self.s.get(url) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: {r.status}")
            return
        if self.router is not None:
            await self._post(self.router + "/generate", orjson.dumps(self.body))
            return
        data = orjson.dumps({**self.body, "bootstrap_host": "127.0.0.1", "bootstrap_port": self.bport,
                             "bootstrap_room": random.getrandbits(63)})
        await asyncio.gather(self._post(self.prefill + "/generate", data), self._post(self.decode + "/generate", data))


async def latency(targets: list[Target], n: int) -> list[tuple[float, float]]:
    """(p50, p99) in ms per target; requests alternate between the targets so that all see the same machine."""
    for t in targets:
        for _ in range(max(5, n // 10)):  # warm-up (connections, caches)
            await t.one()
    lat: list[list[float]] = [[] for _ in targets]
    for _ in range(n):
        for i, t in enumerate(targets):
            t0 = time.perf_counter()
            await t.one()
            lat[i].append(time.perf_counter() - t0)
    out = []
    for xs in lat:
        xs.sort()
        out.append((xs[len(xs) // 2] * 1e3, xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3))
    return out


async def throughput(t: Target, clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await t.one()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


# ---- main ------------------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace) -> None:
    procs: list[Proc] = []
    try:
        sp, sd = free_port(), free_port()
        procs += [Proc("stub-prefill", [PY, __file__, "--stub-worker", str(sp)]),
                  Proc("stub-decode", [PY, __file__, "--stub-worker", str(sd)])]
        stubs = (f"http://127.0.0.1:{sp}", 8998, f"http://127.0.0.1:{sd}")
        if args.prefill:
            real = (args.prefill, args.bootstrap_port, args.decode)
        else:
            servers, p, b, d = start_real(args.backend)
            procs += servers
            real = (p, b, d)
        for proc, url in zip(procs, [stubs[0], stubs[2], real[0], real[2]]):
            await wait_ok(url + "/health", proc, 300)
        routers: dict[str, dict[str, str]] = {}  # router -> worker set -> base url
        for kind in args.routers:
            if kind == "smg" and router_cmd("smg", 1, *real, args.policy) is None:
                print("[smg] not installed (pip install smg): skipped")
                continue
            if kind == "smg":
                await smg_cli_check(real, args.policy, procs)
            for wset, (p, b, d) in (("stub", stubs), ("real", real)):
                try:
                    env = dict(e.split("=", 1) for e in args.router_env) if kind == "pdserve" else None
                    routers.setdefault(kind, {})[wset] = await start_router(kind, p, b, d, args.policy, procs, env)
                except RuntimeError as e:
                    print(f"[{kind}] did not start in front of the {wset} workers: {e}")

        rows = []
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
            for workload, wset in (("models", "real"), ("stub", "stub"), ("gen1", "real")):
                p, b, d = stubs if wset == "stub" else real
                names = ["direct"] + [k for k, v in routers.items() if v.get(wset)]
                targets = [Target(s, workload, None if n == "direct" else routers[n][wset], p, b, d) for n in names]
                try:
                    lats = await latency(targets, args.requests)
                    rps = [0.0] * len(targets)
                    for _ in range(args.rounds):  # alternate, keep the best round of each
                        for i, t in enumerate(targets):
                            rps[i] = max(rps[i], await throughput(t, args.concurrency, args.seconds))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{workload} failed: {type(e).__name__}: {e}")
                    continue
                base = lats[0]
                rows += [(workload, n, p50, p99, p50 - base[0], p99 - base[1], r)
                         for n, (p50, p99), r in zip(names, lats, rps)]
        print(f"\nrouter overhead, PD mode, policy={args.policy}; latency: {args.requests} sequential requests per path "
              f"(paths interleaved); throughput: {args.concurrency} concurrent clients, best of {args.rounds} x "
              f"{args.seconds:.0f} s; {os.cpu_count()} CPUs shared by clients, routers and workers\n")
        print(f"{'workload':<8} {'path':<9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'req/s':>8}")
        for w, n, p50, p99, a50, a99, rps_ in rows:
            add = ("", "") if n == "direct" else (f"{a50:+.3f}", f"{a99:+.3f}")
            print(f"{w:<8} {n:<9} {p50:8.3f} {p99:8.3f} {add[0]:>8} {add[1]:>8} {rps_:8.0f}")
        print("\nmodels: GET /v1/models (smg answers it from its own registry; pdserve reuses a worker's answer for 5 s); stub: POST "
              "/generate to instant stub workers; gen1: POST /generate, max_new_tokens=1, real prefill + decode. "
              "direct = the client sends to prefill and decode itself, as a PD router does.")
    finally:
        for proc in reversed(procs):
            proc.stop()
        for proc in procs:
            if args.keep_logs:
                print(f"log of {proc.name}: {proc.log.name}")
            else:
                os.unlink(proc.log.name)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--stub-worker":
        run_stub(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", nargs="+", default=["pdserve", "smg"], choices=["pdserve", "smg"])
    ap.add_argument("--policy", default="random", help="router policy (both routers know random, round_robin, ...)")
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per latency measurement")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput measurement")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds per path (the best one counts)")
    ap.add_argument("--backend", default="fake", help="transfer backend of the servers this script starts")
    ap.add_argument("--prefill", help="use this running prefill server (with --bootstrap-port, --decode)")
    ap.add_argument("--bootstrap-port", type=int, default=8998)
    ap.add_argument("--decode")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--router-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment of the pdserve router only, e.g. PYTHONPATH=DIR with uvloop installed in DIR")
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
