"""One load, three load generators: NVIDIA aiperf, guidellm and `pdserve bench` (SGLang bench_serving's metrics)
against the same `pdserve up` deployment (router + 1 prefill + 1 decode), their figures side by side.

    make loadgen && .venv/bin/python benchmarks/load_generators.py [--num-requests 64] [--input-len 256]
        [--output-len 64] [--concurrency 8] [--tools aiperf,guidellm,pdserve-bench] [--pin] [--json-out r.json]

Each tool sends `--num-requests` streaming chat requests with `--concurrency` in flight (closed loop), synthetic
prompts of `--input-len` tokens (bare text, by the model's tokenizer; the chat template adds its own), exactly
`--output-len` output tokens (ignore_eos), temperature 0. Before each tool the workers' prefix caches are
flushed; one unmeasured chat request warms the deployment first. Every tool runs offline (see
tests/loadgen_helpers.py), on any core (`--pin`: on the cores `pdserve up` keeps off the decode engine, with the
prefill, the router and the servers' HTTP fronts). The table shows each tool's
own figures, as its export reports them (definitions differ: docs/benchmarks.md), and pdserve's token counters
(the decode server's `sglang:prompt_tokens_total` / `generation_tokens_total` deltas) beside the tool's counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import httpx  # noqa: E402

from tests import loadgen_helpers as lg  # noqa: E402  (the drivers the test uses)

TOOLS = ("aiperf", "guidellm", "pdserve-bench")


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def run_tool(tool: str, dep: lg.UpDeployment, load: lg.Load, out_dir: str, cpus: set[int] | None) -> dict:
    lg.flush_caches(dep)
    before = lg.counters(dep.decode_urls[0])
    t0 = time.monotonic()
    if tool == "pdserve-bench":
        res = lg.run_pdserve_bench(dep, load, os.path.join(out_dir, tool), cpus=cpus)
        tool_in, tool_out = res.extra["total_input_tokens"], res.extra["total_output_tokens"]
    else:
        res = lg.RUNNERS[tool](dep, load, os.path.join(out_dir, tool), cpus=cpus)
        tool_in = sum(r.tool_input_tokens for r in res.rows)
        tool_out = sum(r.tool_output_tokens for r in res.rows)
    wall = time.monotonic() - t0
    delta = lg.counter_delta(before, lg.counters(dep.decode_urls[0]))
    version = "" if tool == "pdserve-bench" else lg.tool_version(tool)
    return {"tool": tool, "version": version, "cmd": res.cmd, "completed": res.completed, "failed": res.failed,
            "tool_input_tokens": tool_in, "tool_output_tokens": tool_out,
            "pdserve_prompt_tokens": delta["prompt_tokens_total"],
            "pdserve_generation_tokens": delta["generation_tokens_total"],
            "ttft_mean_ms": res.ttft_mean, "ttft_p50_ms": res.ttft_p50, "ttft_p99_ms": res.ttft_p99,
            "itl_mean_ms": res.itl_mean, "itl_p50_ms": res.itl_p50, "output_tok_s": res.output_tok_s,
            "request_s": res.request_s, "tool_cpu_s": res.cpu_s, "wall_s": wall,
            "pdserve_ttft_mean_ms": lg.histogram_mean_ms(delta, "time_to_first_token_seconds"),
            "pdserve_itl_mean_ms": lg.histogram_mean_ms(delta, "inter_token_latency_seconds")}


def table(rows: list[dict]) -> str:
    head = (f"{'tool':<22}{'ok/fail':>8}{'in tok':>8}{'pd in':>8}{'out tok':>8}{'pd out':>8}{'TTFT mean':>10}"
            f"{'p50':>9}{'p99':>9}{'ITL mean':>9}{'p50':>7}{'out tok/s':>10}{'req/s':>7}{'tool CPU s':>11}{'wall s':>8}"
            f"{'pd TTFT':>9}{'pd ITL':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['tool']} {r['version']}".strip()
        lines.append(f"{name:<22}{str(r['completed']) + '/' + str(r['failed']):>8}{r['tool_input_tokens']:>8}"
                     f"{r['pdserve_prompt_tokens']:>8}{r['tool_output_tokens']:>8}{r['pdserve_generation_tokens']:>8}"
                     f"{fmt(r['ttft_mean_ms']):>10}{fmt(r['ttft_p50_ms']):>9}{fmt(r['ttft_p99_ms']):>9}"
                     f"{fmt(r['itl_mean_ms']):>9}{fmt(r['itl_p50_ms']):>7}{fmt(r['output_tok_s']):>10}"
                     f"{fmt(r['request_s'], 2):>7}{fmt(r['tool_cpu_s'], 0):>11}{fmt(r['wall_s'], 0):>8}"
                     f"{fmt(r['pdserve_ttft_mean_ms']):>9}{fmt(r['pdserve_itl_mean_ms']):>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--out-dir", default=None, help="the tools' exports and logs (default: a temporary folder)")
    ap.add_argument("--json-out", default=None, help="the rows of the table as JSON")
    ap.add_argument("--pin", action="store_true",
                    help="run the load generators on the cores `pdserve up` keeps off the decode engine (default: any)")
    args = ap.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise SystemExit(f"unknown tools: {unknown}")
    missing = [t for t in tools if t in lg.RUNNERS and lg.tool_exe(t) is None]
    if missing:
        raise SystemExit(f"not installed under {lg.TOOLS_DIR}: {', '.join(missing)} (run `make loadgen`)")
    load = lg.Load(args.num_requests, args.input_len, args.output_len, args.concurrency)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="pdserve-loadgen-")
    cpus = lg.load_generator_cpus() if args.pin else None

    from pdserve.model.cpu_kernels import cpu_isas, cpu_model_name

    dep = lg.start_up(os.path.join(out_dir, "logs"), "--max-total-tokens", str(args.max_total_tokens))
    rows = []
    try:
        decode_info = httpx.get(dep.decode_urls[0] + "/server_info", timeout=60).json()
        kernel_isa = (decode_info.get("cpu_kernels") or {}).get("isa", "n/a")
        print(f"CPU: {cpu_model_name()} ({platform.machine()}); {os.cpu_count()} cores; kernel paths it runs: "
              f"{', '.join(cpu_isas())}; the servers' path: {kernel_isa}; load generators on cores "
              f"{sorted(cpus) if cpus else 'any'}")
        print(f"model {dep.model}; load: {load.num_requests} chat requests, {load.input_len} input tokens (bare "
              f"text), {load.output_len} output tokens, concurrency {load.concurrency}; exports in {out_dir}",
              flush=True)
        r = httpx.post(dep.url + "/v1/chat/completions", timeout=600, json={
            "model": dep.model, "messages": [{"role": "user", "content": "Warm up."}], "max_tokens": 8})
        r.raise_for_status()
        for tool in tools:
            print(f"running {tool} ...", flush=True)
            rows.append(run_tool(tool, dep, load, out_dir, cpus))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        dep.stop()
    print()
    print(table(rows))
    print("\nin tok / out tok: the tool's own totals; pd in / pd out: the decode server's counters (usage); "
          "pd TTFT / pd ITL: means of the decode server's own histograms over the same run; times in ms; "
          "tool CPU s: user + system time of the tool's processes, start-up included")
    for r in rows:
        print(f"{r['tool']}: {' '.join(r['cmd'])}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu_model_name(), "kernel_isa": kernel_isa, "load": vars(load), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
