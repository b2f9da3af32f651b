"""Issue 19 on this machine: KV-aware prefill routing and the three PD dispatch styles.

    .venv/bin/python benchmarks/pd_dispatch.py [--groups 8] [--per-group 6] [--prefix-len 256]
                                                [--concurrency 4] [--dispatch-prompts 24]

One deployment (`pdserve up` machinery, pdserve/deploy.py): 2 prefills that publish KV cache events
(--kv-events-config) and 1 decode. Routers are started one after the other in front of it, and the prefix
caches flushed between runs:
1. `pdserve bench --dataset shared-prefix` (groups of prompts sharing a long system prefix, the groups
   interleaved, --concurrency at a time) with the prefills routed by random, cache_aware and kv_aware; beside
   them the ideal: one prefill takes every prompt, so each prefix is computed once. Prefix cache hit rate
   (the servers' own cached_tokens / prompt tokens) and TTFT.
2. A random workload (no shared prefixes) under each dispatch style: parallel (SGLang's), prefill-first
   (vLLM's kv_transfer_params) and decode-first (Dynamo's order), round_robin: TTFT and E2E.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace

from pdserve.bench import BenchConfig, BenchResult, format_table, run_benchmarks
from pdserve.deploy import Child, Deployment, free_port, start_deployment

PY = sys.executable


def pd_workers(dep: Deployment) -> tuple[list[tuple[str, str]], list[str]]:
    prefills = [(c.url, c.cmd[c.cmd.index("--disaggregation-bootstrap-port") + 1])
                for c in dep.children if c.name.startswith("prefill-")]
    return prefills, [c.url for c in dep.children if c.name.startswith("decode-")]


def start_router(dep: Deployment, log_dir: str, name: str, flags: list[str],
                 num_prefills: int = 2) -> tuple[Deployment, str]:
    """A pdserve router in front of the deployment's workers, with its own flags (a deployment of its own)."""
    prefills, decodes = pd_workers(dep)
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    cmd = [PY, "-m", "pdserve.launch_router", "--pd-disaggregation", "--host", "127.0.0.1", "--port",
           url.rsplit(":", 1)[1], *flags]
    for prefill_url, bootstrap_port in prefills[:num_prefills]:
        cmd += ["--prefill", prefill_url, bootstrap_port]
    for decode_url in decodes:
        cmd += ["--decode", decode_url]
    router = Child(f"router-{name}", cmd, url, "/readiness", os.path.join(log_dir, f"router-{name}.log"))
    return Deployment([router]).start_ready(120), url


def flush(dep: Deployment) -> None:
    for c in dep.children:
        if c.name.startswith(("prefill-", "decode-")):
            urllib.request.urlopen(urllib.request.Request(c.url + "/flush_cache", method="POST"), timeout=30).close()
    time.sleep(1.0)  # the prefills' BlockRemoved events reach the routers


def run(dep: Deployment, log_dir: str, name: str, flags: list[str], cfg: BenchConfig,
        num_prefills: int = 2) -> BenchResult:
    flush(dep)
    router, url = start_router(dep, log_dir, name, flags, num_prefills)
    try:
        return asyncio.run(run_benchmarks({name: replace(cfg, base_url=url, label=name)}))[name]
    finally:
        router.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=6)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--question-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--dispatch-prompts", type=int, default=24)
    ap.add_argument("--output-file", default=None, help="both tables' summaries as JSON")
    a = ap.parse_args()
    from pdserve.model.cpu_kernels import default_isa

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, kernel path "
          f"{default_isa()} (PDSERVE_CPU_ISA={os.environ.get('PDSERVE_CPU_ISA', 'unset')}), nixl backend")
    log_dir = tempfile.mkdtemp(prefix="pd-dispatch-")
    dep = start_deployment(["--prefill", "2", "--decode", "1", "--prefill-policy", "kv_aware", "--port",
                            str(free_port("127.0.0.1")), "--log-dir", log_dir], log_dir)
    try:
        shared = BenchConfig(dataset="shared-prefix", num_groups=a.groups, prompts_per_group=a.per_group,
                             system_prompt_len=a.prefix_len, question_len=a.question_len, shared_prefix_output_len=4,
                             max_concurrency=a.concurrency, warmup_requests=0, seed=3, progress=False)
        policies = {}
        for policy in ("random", "cache_aware", "kv_aware"):
            policies[policy] = run(dep, log_dir, policy, ["--prefill-policy", policy, "--decode-policy",
                                                          "round_robin"], shared)
        policies["ideal (1 prefill)"] = run(dep, log_dir, "ideal", ["--policy", "round_robin"], shared, 1)
        print(f"\nshared prefix: {a.groups} groups x {a.per_group} prompts, {a.prefix_len}-token prefix + "
              f"{a.question_len}-token question, 4 output tokens, {a.concurrency} at a time; 2 prefills, 1 decode")
        print(format_table(policies))
        ideal = policies["ideal (1 prefill)"].summary["cache_hit_rate"]
        for name in ("random", "cache_aware", "kv_aware"):
            rate = policies[name].summary["cache_hit_rate"]
            print(f"  {name}: hit rate {rate:.3f} = {rate / max(ideal, 1e-9):.0%} of the ideal {ideal:.3f}")

        rand = BenchConfig(dataset="random", num_prompts=a.dispatch_prompts, random_input_len=256,
                           random_output_len=16, random_range_ratio=1.0, max_concurrency=2, warmup_requests=2,
                           seed=4, progress=False)
        styles = {style: run(dep, log_dir, style, ["--dispatch", style, "--policy", "round_robin"], rand)
                  for style in ("parallel", "prefill-first", "decode-first")}
        print(f"\ndispatch styles: {a.dispatch_prompts} random prompts of 256 tokens, 16 output tokens, 2 at a time")
        print(format_table(styles))
        if a.output_file:
            with open(a.output_file, "w") as f:
                json.dump({"policies": {k: v.summary for k, v in policies.items()},
                           "dispatch": {k: v.summary for k, v in styles.items()}}, f, indent=1, default=str)
    finally:
        dep.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
