"""Micro-benchmark: KV-cache writes through each transfer backend vs an in-process copy.

Pool layout of SmolLM2-135M: 30 layers x (K, V) = 60 regions, one slot per token of 3 kv heads x 64 dims
x 4 B = 768 B per region, 46,080 B per token in all. Each write moves N tokens (source slots 0..N-1) to
destination slots that are contiguous (one run per region) or scattered (a random permutation: one run
per slot per region). Sender and receiver are separate processes on 127.0.0.1. Time = write() until
poll() says SUCCESS (busy polling), median of up to --repeats runs (fewer if a case takes > 3 s).

    .venv/bin/python benchmarks/kv_transfer_backends.py [--backends nixl,mooncake] [--tokens 128,1024,4096]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
NUM_REGIONS = 2 * LAYERS
SLOT_BYTES = KV_HEADS * HEAD_DIM * 4  # per region
TOKEN_BYTES = NUM_REGIONS * SLOT_BYTES  # 46,080
HOST = "127.0.0.1"
CASE_BUDGET_S = 3.0


def _pool(num_slots: int, fill: float):
    import torch

    return [torch.full((num_slots, KV_HEADS, HEAD_DIM), fill + r, dtype=torch.float32) for r in range(NUM_REGIONS)]


def _regions(tensors):
    from pdserve.disagg.transfer import MemRegion

    return [MemRegion(t.data_ptr(), t.numel() * 4, SLOT_BYTES) for t in tensors]


def _cases(tokens: list[int], num_slots: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    for n in tokens:
        src = list(range(n))
        yield n, "contiguous", src, list(range(num_slots - n, num_slots))
        yield n, "scattered", src, rng.sample(range(num_slots), n)


def _receiver(conn, backend: str, num_slots: int) -> None:
    from pdserve.disagg.transfer import create_transfer_engine

    pool = _pool(num_slots, 0.0)
    eng = create_transfer_engine(backend, "bench-decode", HOST, _regions(pool))
    conn.send(eng.local_info())
    conn.recv()  # done
    eng.close()


def _sender(conn, backend: str, num_slots: int, tokens: list[int], repeats: int) -> None:
    from pdserve.disagg.backends._runs import merge_adjacent, run_addresses
    from pdserve.disagg.transfer import TransferState, create_transfer_engine, kv_write_runs

    pool = _pool(num_slots, 1000.0)
    regions = _regions(pool)
    eng = create_transfer_engine(backend, "bench-prefill", HOST, regions)
    peer = conn.recv()
    eng.add_peer(peer)
    results = []

    def one(runs) -> float:
        t0 = time.perf_counter()
        h = eng.write(peer.agent_name, runs)
        while (st := eng.poll(h)) is TransferState.TRANSFERRING:
            pass
        dt = time.perf_counter() - t0
        eng.release(h)
        if st is not TransferState.SUCCESS:
            raise RuntimeError(f"{backend} write failed: {h!r}")
        return dt

    one(kv_write_runs(regions, range(NUM_REGIONS), [0], [0]))  # connect / warm up
    for n, kind, src, dst in _cases(tokens, num_slots):
        runs = kv_write_runs(regions, range(NUM_REGIONS), src, dst)
        merged = len(merge_adjacent(*run_addresses(regions, peer.regions, runs))[0])
        times, start = [], time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - start < CASE_BUDGET_S):
            times.append(one(runs))
        results.append((backend, n, kind, n * TOKEN_BYTES, merged, statistics.median(times), len(times)))
    conn.send(results)
    eng.close()


def _memcpy(num_slots: int, tokens: list[int], repeats: int):
    import torch

    torch.set_num_threads(1)  # memory-bound; 2 OpenMP threads on a shared 2-core box stall for ~0.5 s

    src_pool, dst_pool = _pool(num_slots, 1000.0), _pool(num_slots, 0.0)
    results = []
    for n, kind, src, dst in _cases(tokens, num_slots):
        di = torch.tensor(dst)
        times, start = [], time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - start < CASE_BUDGET_S):
            t0 = time.perf_counter()
            for s, d in zip(src_pool, dst_pool):
                if kind == "contiguous":
                    d[dst[0]:dst[0] + n].copy_(s[:n])
                else:
                    d.index_copy_(0, di, s[:n])
            times.append(time.perf_counter() - t0)
        runs = NUM_REGIONS if kind == "contiguous" else NUM_REGIONS * n
        results.append(("memcpy (torch)", n, kind, n * TOKEN_BYTES, runs, statistics.median(times), len(times)))
    return results


def run_backend(backend: str, num_slots: int, tokens: list[int], repeats: int):
    ctx = mp.get_context("spawn")
    rp, rc = ctx.Pipe()
    sp, sc = ctx.Pipe()
    recv = ctx.Process(target=_receiver, args=(rc, backend, num_slots), daemon=True)
    send = ctx.Process(target=_sender, args=(sc, backend, num_slots, tokens, repeats), daemon=True)
    recv.start()
    send.start()
    try:
        if not rp.poll(60):
            raise RuntimeError(f"{backend}: receiver did not start within 60 s")
        sp.send(rp.recv())
        if not sp.poll(600):
            raise RuntimeError(f"{backend}: no result within 600 s")
        return sp.recv()
    finally:
        if recv.is_alive():
            rp.send("done")
        for p in (send, recv):
            p.join(10)
            if p.is_alive():
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="nixl,mooncake")
    ap.add_argument("--tokens", default="128,1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    num_slots = 2 * max(tokens)
    rows = _memcpy(num_slots, tokens, args.repeats)
    for b in filter(None, args.backends.split(",")):
        try:
            rows += run_backend(b, num_slots, tokens, args.repeats)
        except Exception as e:  # noqa: BLE001 - report and go on with the other backends
            print(f"{b}: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"{'backend':<16}{'tokens':>7} {'dst slots':<11}{'bytes':>12}{'runs':>8}{'ms':>10}{'GB/s':>8}{'n':>3}")
    for b, n, kind, nbytes, runs, sec, reps in rows:
        print(f"{b:<16}{n:>7} {kind:<11}{nbytes:>12,}{runs:>8}{sec * 1e3:>10.3f}{nbytes / sec / 1e9:>8.2f}{reps:>3}")


if __name__ == "__main__":
    main()
