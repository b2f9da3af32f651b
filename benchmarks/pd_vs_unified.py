"""What PD buys on this machine: the interference workload against (a) one unified server using every core
with chunked prefill on, and (b) 1 prefill + 1 decode, one core each, both behind pdserve's router.

    .venv/bin/python benchmarks/pd_vs_unified.py [--plot-dir docs/img] [--output-file r.json]

Deployments are started one after the other with `pdserve up` machinery (pdserve/deploy.py); the same
workload (steady decode streams plus long prompts arriving at a set rate) runs against each, then, as a
baseline, the same decode streams for as long with no long prompts (what the machine gives those streams
with no interference at all); a side-by-side table follows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import replace

from pdserve.bench import BenchConfig, format_table, run_benchmarks
from pdserve.deploy import Deployment, add_up_args, free_port, plan


def start(unified: bool, backend: str, log_dir: str) -> tuple[Deployment, str]:
    ap = argparse.ArgumentParser()
    add_up_args(ap)
    port = free_port("127.0.0.1")
    argv = ["--port", str(port), "--transfer-backend", backend, "--log-dir", log_dir] + (["--unified"] if unified else [])
    args = ap.parse_args(argv)
    os.makedirs(log_dir, exist_ok=True)
    dep = Deployment(plan(args, log_dir))
    dep.start()
    try:
        dep.wait_ready()
    except Exception:
        dep.stop()
        raise
    return dep, f"http://127.0.0.1:{port}"


def workload(base_url: str, label: str, a: argparse.Namespace) -> BenchConfig:
    return BenchConfig(base_url=base_url, label=label, dataset="interference", num_decode_streams=a.decode_streams,
                       decode_input_len=32, decode_output_len=a.decode_output_len, num_long_prompts=a.long_prompts,
                       long_prompt_len=a.long_prompt_len, long_prompt_output_len=a.long_prompt_output_len,
                       long_prompt_rate=a.long_prompt_rate,
                       long_prompt_delay=2.0, warmup_requests=2, seed=1, slo_ttft_ms=a.slo_ttft_ms,
                       slo_tpot_ms=a.slo_tpot_ms, slo_itl_ms=a.slo_itl_ms, slo_scales=tuple(a.slo_scale),
                       timeout=600, duration_limit=900)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="nixl")
    ap.add_argument("--decode-streams", type=int, default=4)
    ap.add_argument("--decode-output-len", type=int, default=200)
    ap.add_argument("--long-prompts", type=int, default=4)
    ap.add_argument("--long-prompt-len", type=int, default=1024)
    ap.add_argument("--long-prompt-output-len", type=int, default=8)
    ap.add_argument("--long-prompt-rate", type=float, default=0.4)
    ap.add_argument("--slo-ttft-ms", type=float, default=5000)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--slo-itl-ms", type=float, default=300, help="per-request p99 gap between tokens")
    ap.add_argument("--slo-scale", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8],
                    help="attainment and goodput with every SLO times each factor (DistServe's curve)")
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--output-file", default=None)
    ap.add_argument("--only", choices=["unified", "pd"], default=None, help="run one deployment, not both")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the baseline run of each deployment (the decode streams alone, no long prompts)")
    a = ap.parse_args()
    results, alone = {}, {}  # the interference runs; the same decode streams with no long prompts
    logs = tempfile.mkdtemp(prefix="pd-vs-unified-")
    # The load generator runs on the first core, as `pdserve up` puts the router there (the prefill's core in
    # PD); the deployments are started before the pinning and keep their own.
    all_cores = os.sched_getaffinity(0)
    first_core = min(all_cores)
    for label, unified in (("unified (2 cores, chunked)", True), (f"PD 1P+1D ({a.backend})", False)):
        if a.only and a.only != ("unified" if unified else "pd"):
            continue
        dep, url = start(unified, a.backend, os.path.join(logs, "unified" if unified else "pd"))
        os.sched_setaffinity(0, {first_core})
        try:
            r = asyncio.run(run_benchmarks({label: workload(url, label, a)}))[label]
            results[label] = r
            if not a.no_baseline:  # as long as the interference run, so both sample the machine alike
                base = f"{label.split()[0]}: streams alone"
                cfg = replace(workload(url, base, a), num_long_prompts=0, min_decode_duration=r.summary["duration"])
                alone[base] = asyncio.run(run_benchmarks({base: cfg}))[base]
        finally:
            os.sched_setaffinity(0, all_cores)
            dep.stop()
    print(format_table({**results, **alone}))
    print("\ndecode streams only (the interference victims; 'streams alone': the same streams, no long prompts):")
    for label, r in {**results, **alone}.items():
        d = r.by_kind.get("decode", r.summary)
        print(f"  {label:<28} ITL median {d['median_itl_ms']:.1f} ms, p99 {d['p99_itl_ms']:.1f} ms, "
              f"max {d['max_itl_ms']:.1f} ms; p99/median {d['p99_itl_ms'] / max(d['median_itl_ms'], 1e-9):.2f}")
    print("\nSLO attainment / goodput (req/s) with every SLO (TTFT, TPOT, per-request p99 ITL) times the scale:")
    for label, r in results.items():
        cells = [f"x{p['scale']:g}: {100 * p['attainment']:.0f}% / {p['goodput']:.2f}"
                 for p in r.summary["slo_attainment"]]
        print(f"  {label:<28} " + ", ".join(cells))
    if a.plot_dir:
        from pdserve.bench.plots import write_plots

        for path in write_plots(results, a.plot_dir):
            print(f"plot: {path}")
    if a.output_file:
        with open(a.output_file, "w") as f:
            json.dump({k: r.to_dict() for k, r in {**results, **alone}.items()}, f, indent=1)
    print(f"logs: {logs}", file=sys.stderr)


if __name__ == "__main__":
    main()
