"""KV streamed chunk by chunk vs sent whole after the last chunk (issue: PD payoff).

One prefill + one decode server (nixl or mooncake), the prefill chunking prompts (--chunked-prefill-size); each
long prompt goes to both at once as a router sends it, and the decode's first streamed token is timed (TTFT). Run
once with PDSERVE_KV_CHUNK_STREAMING=0 (the whole prompt's KV after its last chunk) and once streamed, in one
process, same machine; then prints one streamed request's timeline from the prefill's log: when each chunk's KV
left, when the last chunk was computed, when all KV had landed.

    .venv/bin/python benchmarks/pd_chunk_streaming.py [--prompt-len 2048] [--chunk 256] [--num-prompts 6]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import httpx  # noqa: E402

from tests.pd_helpers import start_decode, start_prefill, stop_all, with_bootstrap  # noqa: E402


def ttft_once(prefill, decode, prompt_ids: list[int]) -> float:
    body = with_bootstrap({"input_ids": prompt_ids, "stream": True,
                           "sampling_params": {"max_new_tokens": 2, "temperature": 0}}, prefill)
    with cf.ThreadPoolExecutor(1) as ex:
        t0 = time.perf_counter()
        leg = ex.submit(httpx.post, prefill.server.base_url + "/generate", json=body, timeout=600)
        ttft = None
        with httpx.stream("POST", decode.base_url + "/generate", json=body, timeout=600) as r:
            for line in r.iter_lines():  # read to the end (the request's whole answer)
                if ttft is None and line.startswith("data:") and line.strip() != "data: [DONE]":
                    ttft = time.perf_counter() - t0
        assert leg.result().status_code == 200
    return ttft


def run_mode(args, streaming: bool, rng: random.Random) -> tuple[list[float], str]:
    env = {"PDSERVE_KV_CHUNK_STREAMING": "1" if streaming else "0"}
    prefill = start_prefill(args.backend, ["--chunked-prefill-size", str(args.chunk), "--log-level", "debug"],
                            env=env)  # debug: the prefill logs each streamed room's timeline
    decode = None
    try:
        decode = start_decode(args.backend)
        ttft_once(prefill, decode, [rng.randrange(100, 40000) for _ in range(64)])  # warm up
        ttfts = [ttft_once(prefill, decode, [rng.randrange(100, 40000) for _ in range(args.prompt_len)])
                 for _ in range(args.num_prompts)]
        return ttfts, prefill.server.log()
    finally:
        stop_all(prefill, *(d for d in (decode,) if d is not None))


def draw(timeline: dict, width: int = 60) -> str:
    end = timeline["landed_ms"] or 1.0
    scale = width / end
    lines = [f"room {timeline['room']}: {timeline['num_tokens']} tokens, 0 = first chunk's KV sent (ms)"]
    for t, tokens in timeline["chunks"]:
        lines.append(f"  {t:8.1f}  {' ' * int(t * scale)}^ KV of tokens [..{tokens}) sent, next chunk computing")
    t = timeline["last_computed_ms"]
    lines.append(f"  {t:8.1f}  {' ' * int(t * scale)}| last chunk computed: its tail + metadata row sent")
    lines.append(f"  {end:8.1f}  {' ' * int(end * scale)}* every chunk landed (decode may start)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="nixl", choices=["nixl", "mooncake"])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256, help="the prefill's --chunked-prefill-size")
    p.add_argument("--num-prompts", type=int, default=6)
    args = p.parse_args()
    from pdserve.model.cpu_kernels import cpu_isas, cpu_model_name, default_isa

    print(f"CPU: {cpu_model_name()}; kernel paths: {', '.join(cpu_isas())}; used: {default_isa()}; "
          f"backend {args.backend}; {args.num_prompts} prompts of {args.prompt_len} tokens, chunks of {args.chunk}")
    rows, log = {}, ""
    for streaming in (False, True):
        ttfts, server_log = run_mode(args, streaming, random.Random(1))
        rows["streamed per chunk" if streaming else "whole after last chunk"] = ttfts
        if streaming:
            log = server_log
    print(f"\n{'KV sent':<26}{'TTFT mean ms':>14}{'TTFT p50 ms':>14}{'min ms':>10}{'max ms':>10}")
    for name, ttfts in rows.items():
        ms = [t * 1e3 for t in ttfts]
        print(f"{name:<26}{statistics.mean(ms):>14.1f}{statistics.median(ms):>14.1f}{min(ms):>10.1f}{max(ms):>10.1f}")
    timelines = [json.loads(line.split("kv stream timeline ", 1)[1]) for line in log.splitlines()
                 if "kv stream timeline " in line]
    if timelines:
        tails = [t["landed_ms"] - t["last_computed_ms"] for t in timelines]
        print(f"\nstreamed: KV landed {statistics.median(tails):.1f} ms (median) after the last chunk was computed")
        print(draw(timelines[-1]))


if __name__ == "__main__":
    main()
