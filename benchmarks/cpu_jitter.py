"""How steady is one core of this machine? The floor under any ITL ratio measured here.

    .venv/bin/python benchmarks/cpu_jitter.py [--seconds 20] [--cpu 1]

Runs two fixed pieces of work over and over on one core, nothing else of pdserve running, and prints the
spread of their times side by side: (a) a decode step's worth of weight streaming (pdserve's GEMV kernel
over packed fp32 weights the size of SmolLM2-135M's layers, 4 rows), and (b) the same kernel on a weight that
stays in L2 (pure compute), repeated to take about as long. The work never changes, so every bit of spread
is the machine's (the hypervisor, other tenants, the memory system): a decode server cannot have a steadier
ITL than this.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pdserve.model import cpu_kernels

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152  # SmolLM2-135M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="per kind of work")
    ap.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="core to run on")
    ap.add_argument("--rows", type=int, default=4, help="rows per GEMV (decode batch size)")
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    torch.set_num_threads(1)
    k = cpu_kernels.load()
    if k is None:
        raise SystemExit("the CPU kernels are not available here (PDSERVE_DISABLE_CPU_KERNELS, or no gcc)")
    shapes = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE), (INTERMEDIATE, HIDDEN)] * LAYERS
    weights = [k.pack(torch.randn(*s)) for s in shapes] + [k.pack(torch.randn(HIDDEN, VOCAB))]
    small = k.pack(torch.randn(HIDDEN, 384))  # 0.9 MB: stays in L2
    x = torch.randn(a.rows, HIDDEN)
    xs = {w.in_features: torch.randn(a.rows, w.in_features) for w in weights}

    def stream() -> None:
        for w in weights:
            k.linear(xs[w.in_features], w)

    t = time.perf_counter()
    stream()
    step_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(50):
        k.linear(x, small)
    reps = max(1, round(step_s / ((time.perf_counter() - t) / 50)))

    def compute() -> None:
        for _ in range(reps):
            k.linear(x, small)

    rows = []
    for name, fn in ((f"weight streaming ({sum(w.panels.numel() for w in weights) * 4 >> 20} MB)", stream),
                     ("L2-resident compute", compute)):
        times, end = [], time.perf_counter() + a.seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        rows.append((name, len(times), med, times[int(0.9 * len(times))], times[int(0.99 * len(times))], times[-1]))
    print(f"one core (cpu {a.cpu}), {a.seconds:g} s of each, {a.rows} rows per GEMV")
    print(f"{'work':<34}{'runs':>6}{'median ms':>11}{'p90/med':>9}{'p99/med':>9}{'max/med':>9}")
    for name, n, med, p90, p99, mx in rows:
        print(f"{name:<34}{n:>6}{1e3 * med:>11.1f}{p90 / med:>9.2f}{p99 / med:>9.2f}{mx / med:>9.2f}")


if __name__ == "__main__":
    main()
