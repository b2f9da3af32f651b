"""Fault tolerance on a multi-host PD deployment: the table of fault scenarios beside Dynamo's published figures.

    sudo .venv/bin/python benchmarks/faults.py [--backend nixl] [--concurrency 3] [--tokens 24]

2 prefill + 2 decode servers (SmolLM2-135M, one thread each), each in its own network namespace joined to a
bridge by a veth pair (decode links through a frame relay that can delay, drop or hold frames); the router in the
root namespace with health checks every 0.5 s and a 3 s stream stall timeout. Per scenario: a closed-loop load of
`--concurrency` greedy /generate streams of `--tokens` tokens, 2 s before the fault, the fault, the heal, a few
seconds after; the figures cover the requests that overlapped the fault window (pdserve/bench/faults.py):
success %, answers equal to an undisturbed run's, the longest pause in which no client got a token, p99 TTFT
and ITL. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DYNAMO = """Dynamo's published figures (tests/fault_tolerance, 10 clients x 150 requests):
  with a replica: >= 90% success and recovery <= 60 s required; disaggregated without redundancy, decode killed:
  200 of 800 succeeded (25%), never recovered. SGLang: 5% injected transfer failures, no server may crash."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="nixl", choices=("nixl", "mooncake", "fake"))
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--only", default="", help="run only scenarios whose function name contains this text")
    args = ap.parse_args()
    from pdserve.bench import faults
    from pdserve.bench.netns import Network, skip_reason
    from pdserve.model.cpu_kernels import default_isa

    reason = skip_reason()
    if reason is not None:
        print(f"cannot run: {reason}")
        return 2
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, kernel path "
          f"{default_isa()} (PDSERVE_CPU_ISA={os.environ.get('PDSERVE_CPU_ISA', 'unset')}), backend {args.backend}")
    net = Network()
    dep = None
    results = []
    try:
        dep = faults.Deployment(net, 2, 2, args.backend, faults.ROUTER_ARGS)
        refs = faults.references(dep, args.tokens)
        for scenario in faults.BENCH_SCENARIOS:
            if args.only in scenario.__name__:
                results.append(scenario(dep, refs))
                print(faults.format_results(results[-1:]).splitlines()[-1], flush=True)
    finally:
        if dep is not None:
            dep.close()
        net.close()
    print()
    print(faults.format_results(results))
    print()
    print(DYNAMO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
