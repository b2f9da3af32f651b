"""KV transfer: per-backend bandwidth beside memcpy, and TTFT through PD vs unified, in one run.

    .venv/bin/python benchmarks/kv_transfer.py [--backends nixl,mooncake] [--tokens 128,1024,4096] [--ttft-runs 5]

Part 1 runs benchmarks/kv_transfer_backends.py (two processes, the real backends, SmolLM2-135M's KV layout:
46,080 bytes per token). Then the cost of one control message (disagg/wire.py: encode + checked decode,
unsigned and HMAC-signed with replay check), per message kind. Part 2 starts real servers on 127.0.0.1: one unified server, then for each backend
one prefill + one decode, all with one torch thread, and measures time to first token of a 512-token prompt
(streamed from the decode, the prefill half sent at the same moment, as a router does).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import start_server, stop_server  # noqa: E402  (reuse the real-server launcher)
from tests.pd_helpers import start_decode, start_prefill, stop_all, with_bootstrap  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "the of and to in is you that it he was for on are as with his they at be this have from".split()


def prompt_512() -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(510))


def ttft_stream(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def bench_unified(runs: int) -> list[float]:
    srv = start_server(["--num-threads", "1", "--disable-radix-cache", "--max-total-tokens", "8192"])
    try:
        out = []
        for i in range(runs + 1):
            body = {"text": f"{i} " + prompt_512(), "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
            t = ttft_stream(srv.base_url, body)
            if i:  # first is warmup
                out.append(t)
        return out
    finally:
        stop_server(srv)


def bench_pd(backend: str, runs: int) -> list[float]:
    prefill = start_prefill(backend, extra=["--disable-radix-cache"])
    decode = start_decode(backend)
    try:
        out = []
        for i in range(runs + 1):
            body = with_bootstrap({"text": f"{i} " + prompt_512(),
                                   "sampling_params": {"max_new_tokens": 1, "temperature": 0}}, prefill)
            with cf.ThreadPoolExecutor(1) as ex:
                fp = ex.submit(httpx.post, prefill.server.base_url + "/generate", json=body, timeout=300)
                t = ttft_stream(decode.base_url, body)
                assert fp.result().status_code == 200
            if i:
                out.append(t)
        return out
    finally:
        stop_all(prefill, decode)


def control_frame_cost(repeats: int = 20000) -> None:
    """Microseconds per control message, send + receive side, unsigned and signed (same process, no socket)."""
    from pdserve.disagg.messages import PD_MESSAGES, KVDestination, PeerRegister, TransferDone
    from pdserve.disagg.transfer import AgentInfo, MemRegion
    from pdserve.disagg.wire import FrameCodec

    regions = tuple(MemRegion(1 << 40, 1 << 30, 46_080 // 60) for _ in range(61))
    messages = {"PeerRegister (61 regions, 4 KB agent)": PeerRegister(AgentInfo("nixl", "d", b"x" * 4096, regions),
                                                                      "tcp://10.0.0.2:5555"),
                "KVDestination (512 slots)": KVDestination(1 << 62, "d", tuple(range(512)), 3, 512, 1 << 61),
                "TransferDone": TransferDone(1 << 62, ok=True, nonce=1 << 61)}
    print("\n== control frame cost (encode + checked decode, one message) ==", flush=True)
    print(f"{'message':<40}{'bytes':>8}{'unsigned us':>13}{'signed us':>11}")
    for name, msg in messages.items():
        costs = []
        for secret in (None, b"benchmark-secret-0123"):
            tx, rx = FrameCodec(PD_MESSAGES, secret), FrameCodec(PD_MESSAGES, secret)
            n = len(tx.encode(msg)[0])
            t0 = time.perf_counter()
            for _ in range(repeats):
                rx.decode(tx.encode(msg))
            costs.append((time.perf_counter() - t0) / repeats * 1e6)
        print(f"{name:<40}{n:>8}{costs[0]:>13.1f}{costs[1]:>11.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="nixl,mooncake")
    ap.add_argument("--tokens", default="128,1024,4096")
    ap.add_argument("--ttft-runs", type=int, default=5)
    ap.add_argument("--skip-bandwidth", action="store_true")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if not args.skip_bandwidth:
        print("== KV bytes and bandwidth per backend (two processes) ==", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "kv_transfer_backends.py"), "--backends",
                        ",".join(backends), "--tokens", args.tokens], check=True)
    control_frame_cost()
    print("\n== TTFT of a 512-token prompt, 1 torch thread per server ==", flush=True)
    rows = {"unified": bench_unified(args.ttft_runs)}
    for b in backends:
        rows[f"PD ({b})"] = bench_pd(b, args.ttft_runs)
    base = statistics.median(rows["unified"])
    print(f"{'setup':<16}{'median TTFT ms':>16}{'min ms':>10}{'max ms':>10}{'vs unified':>12}")
    for name, ts in rows.items():
        med = statistics.median(ts)
        print(f"{name:<16}{med * 1e3:>16.1f}{min(ts) * 1e3:>10.1f}{max(ts) * 1e3:>10.1f}{(med / base - 1) * 100:>+11.1f}%")


if __name__ == "__main__":
    main()
