"""What PD buys on this machine: the interference workload against (a) one unified server using every core
with chunked prefill on, and (b) 1 prefill + 1 decode, one core each, both behind pdserve's router.

    .venv/bin/python benchmarks/pd_vs_unified.py [--plot-dir docs/img] [--output-file r.json]
                                                 [--long-prompt-rate 0.1 0.2 0.3] [--no-baseline]

Deployments are started one after the other with `pdserve up` machinery (pdserve/deploy.py); the same
workload (steady decode streams, long prompts arriving at a set rate, short requests arriving while they run)
runs against each, at each rate, then, as a baseline, the same decode streams for as long with no long prompts
(what the machine gives those streams with no interference at all). Per rate: a side-by-side table, SLO
attainment and goodput against the SLO scale, and the issue-18 targets (PD against unified); with several
rates, attainment and goodput against the rate (goodput_vs_rate.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import replace

from pdserve.bench import BenchConfig, BenchResult, format_table, run_benchmarks
from pdserve.bench.metrics import attainment_at
from pdserve.config import SCHEDULE_POLICIES
from pdserve.deploy import (
    CHUNKED_PREFILL_SIZE,
    Deployment,
    free_port,
    start_deployment,
)


def start(unified: bool, a: argparse.Namespace, log_dir: str) -> tuple[Deployment, str]:
    port = free_port("127.0.0.1")
    chunk = a.unified_chunked_prefill_size if unified and a.unified_chunked_prefill_size else a.chunked_prefill_size
    argv = ["--port", str(port), "--transfer-backend", a.backend, "--log-dir", log_dir,
            "--chunked-prefill-size", str(chunk), "--schedule-policy", a.schedule_policy,
            "--prefill-layer-slices", str(a.prefill_layer_slices)] + (["--unified"] if unified else [])
    return start_deployment(argv, log_dir), f"http://127.0.0.1:{port}"


def workload(base_url: str, label: str, a: argparse.Namespace, rate: float, seed: int = 1) -> BenchConfig:
    return BenchConfig(base_url=base_url, label=label, dataset="interference", num_decode_streams=a.decode_streams,
                       decode_input_len=32, decode_output_len=a.decode_output_len, num_long_prompts=a.long_prompts,
                       long_prompt_len=a.long_prompt_len, long_prompt_output_len=a.long_prompt_output_len,
                       long_prompt_rate=rate,
                       long_prompt_delay=2.0, short_request_rate=a.short_request_rate,
                       short_output_len=16, warmup_requests=2, seed=seed, slo_ttft_ms=a.slo_ttft_ms,
                       slo_tpot_ms=a.slo_tpot_ms, slo_itl_ms=a.slo_itl_ms, slo_scales=tuple(a.slo_scale),
                       timeout=600, duration_limit=900)


def kind(r: BenchResult, name: str) -> dict:
    return r.by_kind.get(name, r.summary)


def itl_ratio(d: dict) -> float:
    """p99 / median inter-token latency of a summary."""
    return d["p99_itl_ms"] / max(d["median_itl_ms"], 1e-9)


def median_short_ttft(r: BenchResult) -> float:
    return statistics.median(short_ttfts_under_interference(r) or [math.nan])


def short_ttfts_under_interference(r: BenchResult) -> list[float]:
    """TTFTs (ms) of the short requests (--short-request-rate) sent while a long prompt was waiting for its first
    token."""
    longs = [(rec.start_time, rec.start_time + rec.ttft) for rec in r.records if rec.kind == "long" and rec.ttft]
    return [1e3 * rec.ttft for rec in r.records if rec.kind == "short" and rec.success and rec.ttft is not None
            and any(begin <= rec.start_time < end for begin, end in longs)]


def print_targets(unified: BenchResult, pd: BenchResult) -> None:
    """The issue's targets, PD against unified in the same run."""
    short_u, short_p = median_short_ttft(unified), median_short_ttft(pd)
    long_u, long_p = kind(unified, "long")["median_ttft_ms"], kind(pd, "long")["median_ttft_ms"]
    dec = kind(pd, "decode")
    below = [(u, p) for u, p in zip(unified.summary["slo_attainment"], pd.summary["slo_attainment"])
             if u["attainment"] < 0.5]
    cells = ", ".join(f"x{u['scale']:g}: {p['goodput'] / u['goodput']:.2f}x" if u["goodput"] else
                      f"x{u['scale']:g}: {p['goodput']:.2f} vs 0" for u, p in below) or "none (unified >= 50% everywhere)"
    print(f"  PD goodput / unified's where unified's attainment < 50% (target >= 1.5x): {cells}")
    counts = "/".join(str(len(short_ttfts_under_interference(r))) for r in (pd, unified))
    print(f"  short requests' median TTFT while a long prompt waits ({counts} requests): PD {short_p:.0f} ms, "
          f"unified {short_u:.0f} ms: {short_p / max(short_u, 1e-9):.2f}x (target <= 1.5x)")
    print(f"  long prompts' median TTFT: PD {long_p:.0f} ms, unified {long_u:.0f} ms: "
          f"{long_p / max(long_u, 1e-9):.2f}x (target <= 2.2x)")
    print(f"  PD decode ITL p99 / median: {dec['p99_itl_ms']:.1f} / {dec['median_itl_ms']:.1f} ms = {itl_ratio(dec):.2f} "
          f"(target <= 1.3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="nixl")
    ap.add_argument("--decode-streams", type=int, default=4)
    ap.add_argument("--decode-output-len", type=int, default=200)
    ap.add_argument("--long-prompts", type=int, default=4)
    ap.add_argument("--long-prompt-len", type=int, default=1024)
    ap.add_argument("--long-prompt-output-len", type=int, default=8)
    ap.add_argument("--short-request-rate", type=float, default=1.0,
                    help="short requests per second (Poisson) while the long prompts run: their TTFT")
    ap.add_argument("--long-prompt-rate", type=float, nargs="+", default=[0.4],
                    help="long prompts per second; several: a request-rate sweep (goodput_vs_rate.png)")
    ap.add_argument("--chunked-prefill-size", type=int, default=CHUNKED_PREFILL_SIZE,
                    help="of every server that prefills (pdserve up's default)")
    ap.add_argument("--schedule-policy", default="spf", choices=SCHEDULE_POLICIES,
                    help="of every server that prefills, unified and PD alike")
    ap.add_argument("--prefill-layer-slices", type=int, default=3,
                    help="of every server that prefills (with spf: a short prompt waits one slice of a step)")
    ap.add_argument("--unified-chunked-prefill-size", type=int, default=None,
                    help="the unified server's, where it should differ")
    ap.add_argument("--slo-ttft-ms", type=float, default=5000)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--slo-itl-ms", type=float, default=300, help="per-request p99 gap between tokens")
    ap.add_argument("--slo-scale", type=float, nargs="+", default=[0.25, 0.35, 0.5, 0.7, 1, 1.4, 2, 2.8, 4, 8],
                    help="attainment and goodput with every SLO times each factor (DistServe's curve)")
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--output-file", default=None)
    ap.add_argument("--only", choices=["unified", "pd"], default=None, help="run one deployment, not both")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the baseline run of each deployment (the decode streams alone, no long prompts)")
    a = ap.parse_args()
    sweeps: dict[str, dict[float, BenchResult]] = {}  # deployment -> rate -> the interference run
    alone: dict[str, BenchResult] = {}  # the same decode streams with no long prompts
    logs = tempfile.mkdtemp(prefix="pd-vs-unified-")
    # The load generator runs on the first core, as `pdserve up` puts the router there (the prefill's core in
    # PD); the deployments are started before the pinning and keep their own.
    all_cores = os.sched_getaffinity(0)
    first_core = min(all_cores)
    for label, unified in (("unified (2 cores, chunked)", True), (f"PD 1P+1D ({a.backend})", False)):
        if a.only and a.only != ("unified" if unified else "pd"):
            continue
        dep, url = start(unified, a, os.path.join(logs, "unified" if unified else "pd"))
        os.sched_setaffinity(0, {first_core})
        try:
            for rate in a.long_prompt_rate:
                # a fresh seed per rate: fresh prompts (no prefix-cache hits on the last run's)
                cfg = workload(url, label, a, rate, seed=1 + a.long_prompt_rate.index(rate))
                r = asyncio.run(run_benchmarks({label: cfg}))[label]
                sweeps.setdefault(label, {})[rate] = r
            if not a.no_baseline:  # as long as the (first) interference run, so both sample the machine alike
                base = f"{label.split()[0]}: streams alone"
                first = sweeps[label][a.long_prompt_rate[0]]
                cfg = replace(workload(url, base, a, a.long_prompt_rate[0], seed=100), num_long_prompts=0,
                              min_decode_duration=first.summary["duration"])
                alone[base] = asyncio.run(run_benchmarks({base: cfg}))[base]
        finally:
            os.sched_setaffinity(0, all_cores)
            dep.stop()
    for rate in a.long_prompt_rate:
        results = {label: by_rate[rate] for label, by_rate in sweeps.items()}
        print(f"\n===== long prompts at {rate:g}/s =====")
        print(format_table({**results, **(alone if rate == a.long_prompt_rate[0] else {})}))
        print("\ndecode streams only (the interference victims; 'streams alone': the same streams, no long prompts):")
        for label, r in {**results, **(alone if rate == a.long_prompt_rate[0] else {})}.items():
            d = kind(r, "decode")
            print(f"  {label:<28} ITL median {d['median_itl_ms']:.1f} ms, p99 {d['p99_itl_ms']:.1f} ms, "
                  f"max {d['max_itl_ms']:.1f} ms; p99/median {itl_ratio(d):.2f}")
        print("\nSLO attainment / goodput (req/s) with every SLO (TTFT, TPOT, per-request p99 ITL) times the scale:")
        for label, r in results.items():
            cells = [f"x{p['scale']:g}: {100 * p['attainment']:.0f}% / {p['goodput']:.2f}"
                     for p in r.summary["slo_attainment"]]
            print(f"  {label:<28} " + ", ".join(cells))
        if len(results) == 2:
            print("\nagainst the issue-18 targets:")
            print_targets(*results.values())
        if a.plot_dir:
            from pdserve.bench.plots import write_plots

            sub = a.plot_dir if len(a.long_prompt_rate) == 1 else os.path.join(a.plot_dir, f"rate-{rate:g}")
            for path in write_plots(results, sub):
                print(f"plot: {path}")
    if len(a.long_prompt_rate) > 1:
        print("\nagainst the long prompts' rate (SLO x1): attainment / goodput (req/s) / short median TTFT ms / "
              "long median TTFT ms / decode ITL p99/median")
        for label, by_rate in sweeps.items():
            cells = []
            for rate, r in sorted(by_rate.items()):
                p = attainment_at(r.summary, 1.0)
                att = f"{100 * p['attainment']:.0f}% / {p['goodput']:.2f}" if p else "-"
                cells.append(f"{rate:g}/s: {att} / {median_short_ttft(r):.0f} / "
                             f"{kind(r, 'long')['median_ttft_ms']:.0f} / {itl_ratio(kind(r, 'decode')):.2f}")
            print(f"  {label:<28} " + "; ".join(cells))
        if a.plot_dir and 1.0 in a.slo_scale:
            from pdserve.bench.plots import write_rate_plot

            print(f"plot: {write_rate_plot(sweeps, os.path.join(a.plot_dir, 'goodput_vs_rate.png'))}")
    if a.output_file:
        with open(a.output_file, "w") as f:
            json.dump({f"{label} @ {rate:g}/s": r.to_dict() for label, by_rate in sweeps.items()
                       for rate, r in by_rate.items()} | {k: r.to_dict() for k, r in alone.items()}, f, indent=1)
    print(f"logs: {logs}", file=sys.stderr)


if __name__ == "__main__":
    main()
