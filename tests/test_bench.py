"""`pdserve bench`: metrics and datasets in-process, then real runs (subprocess) against the real server."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from pdserve.bench import BenchConfig, RequestRecord, format_table, run_benchmarks
from pdserve.bench.datasets import WORDS, random_requests, shared_prefix_requests
from pdserve.bench.config import Slo
from pdserve.bench.metrics import SUMMARY_KEYS, percentile, summarize
from pdserve.cli import build_parser
from tests.conftest import REPO_ROOT, ServerProcess

# The lines of SGLang's bench_serving table (names and order), plus our goodput line.
TABLE_LINES = [
    "Successful requests:", "Benchmark duration (s):", "Total input tokens:", "Total generated tokens:",
    "Request throughput (req/s):", "Goodput (req/s):", "Input token throughput (tok/s):",
    "Output token throughput (tok/s):", "Total token throughput (tok/s):", "Concurrency:",
    "Mean E2E Latency (ms):", "Median E2E Latency (ms):", "P99 E2E Latency (ms):",
    "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
    "Mean TPOT (ms):", "Median TPOT (ms):", "P99 TPOT (ms):",
    "Mean ITL (ms):", "Median ITL (ms):", "P95 ITL (ms):", "P99 ITL (ms):", "Max ITL (ms):",
]
JSON_COLUMNS = [
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "goodput", "input_throughput", "output_throughput", "total_throughput", "concurrency",
    "mean_e2e_latency_ms", "median_e2e_latency_ms", "p99_e2e_latency_ms",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p95_itl_ms", "p99_itl_ms", "max_itl_ms",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(server: ServerProcess, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # generous: a slower machine (or a lower ISA path) must only take longer, never fail
    cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", server.base_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def table_value(stdout: str, label: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(label))
    return line[len(label):].strip()


def record(index: int, ttft: float, itl: list[float], output_len: int, success: bool = True,
           kind: str = "random") -> RequestRecord:
    return RequestRecord(index=index, kind=kind, prompt_len=10, expected_output_len=output_len, ttft=ttft,
                         itl=itl, e2e=ttft + sum(itl), output_len=output_len, success=success, done=True)


# ---- in-process: metrics, datasets, flags -------------------------------------------------------------
def test_percentile_matches_numpy():
    rng = random.Random(0)
    values = [rng.random() for _ in range(37)]
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


def test_summarize_definitions_and_goodput():
    recs = [record(0, 0.1, [0.05, 0.05, 0.05], 4), record(1, 0.3, [0.2, 0.2], 3),
            record(2, 0.2, [], 1), record(3, 0.1, [9.0], 2, success=False)]
    recs[0].cached_len, recs[3].cached_len = 6, 10  # the failed request's does not count
    s = summarize(recs, duration=2.0, slo=Slo(ttft_ms=250, tpot_ms=100))
    assert tuple(s) == SUMMARY_KEYS and set(JSON_COLUMNS) <= set(s)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 8
    assert s["cache_hit_rate"] == pytest.approx(6 / 30)
    assert s["request_throughput"] == pytest.approx(1.5) and s["output_throughput"] == pytest.approx(4.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT (e2e - ttft) / (n - 1): 50 ms and 200 ms; the one-token request has none.
    assert s["mean_tpot_ms"] == pytest.approx(125.0)
    # ITL pools the gaps of successful requests only (the failed request's 9 s gap is out).
    assert s["max_itl_ms"] == pytest.approx(200.0) and s["mean_itl_ms"] == pytest.approx(110.0)
    assert s["concurrency"] == pytest.approx((0.25 + 0.7 + 0.2) / 2.0)
    # Goodput: #0 meets both SLOs, #1 misses both, #2 (one token, no TPOT) meets the TTFT SLO.
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    assert summarize(recs, 2.0)["good_requests"] == 3  # no SLO: every success counts
    empty = summarize([], 1.0)
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] is None and empty["max_itl_ms"] is None


def test_itl_slo_per_request_and_slo_scale_sweep():
    smooth = record(0, 0.1, [0.04] * 20, 21)  # p99 gap 40 ms, max 40 ms
    one_stall = record(1, 0.1, [0.05] * 199 + [0.9], 201)  # one 900 ms stall in 200 gaps: p99 ~ 58 ms, max 900
    choppy = record(2, 0.1, [0.05, 0.3] * 10, 21)  # every other gap 300 ms: p99 300 ms
    recs = [smooth, one_stall, choppy]
    assert summarize(recs, 1.0, Slo(itl_ms=100))["good_requests"] == 2  # p99: the single stall passes
    assert summarize(recs, 1.0, Slo(itl_ms=100, itl_max_ms=500))["good_requests"] == 1  # max: it does not
    s = summarize(recs, 2.0, Slo(itl_ms=100, itl_max_ms=500), slo_scales=(0.5, 1, 2, 4))
    got = [(x["scale"], x["good_requests"]) for x in s["slo_attainment"]]
    # x0.5 (p99 <= 50, max <= 250): smooth; x1: smooth; x2 (200, 1000): + the stall; x4: all three
    assert got == [(0.5, 1), (1, 1), (2, 2), (4, 3)]
    assert s["slo_attainment"][3]["attainment"] == 1.0 and s["slo_attainment"][3]["goodput"] == pytest.approx(1.5)
    assert summarize([record(3, 0.1, [2.0], 2)], 1.0, Slo(itl_ms=10))["good_requests"] == 1  # one gap: no p99


def test_datasets_lengths_and_seed(tokenizer):
    cfg = BenchConfig(num_prompts=50, random_input_len=40, random_output_len=10, random_range_ratio=0.5)
    a, b = random_requests(cfg, random.Random(7)), random_requests(cfg, random.Random(7))
    assert a == b and len(a) == 50
    assert all(20 <= s.prompt_len <= 40 and 5 <= s.output_len <= 10 for s in a)
    assert len({s.prompt_len for s in a}) > 5
    # Each word is one token after a space and at a prompt's start, so N words are N tokens for the default model.
    assert all(len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1 for w in WORDS)
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in WORDS)
    assert len(tokenizer.encode(a[0].prompt, add_special_tokens=False)) == a[0].prompt_len

    sp = BenchConfig(dataset="shared-prefix", num_groups=3, prompts_per_group=4, system_prompt_len=50,
                     question_len=5)
    specs = shared_prefix_requests(sp, random.Random(1))
    assert len(specs) == 12 and [s.index for s in specs] == list(range(12))
    for g in range(3):
        group = [s for s in specs if s.group == g]
        assert len(group) == 4 and len({s.system for s in group}) == 1 and len({s.prompt for s in group}) == 4
    assert len({s.system for s in specs}) == 3


def test_bench_flags():
    parser = build_parser()
    args = parser.parse_args(["bench", "--num-prompts", "3", "--request-rate", "2.5", "--dataset", "interference"])
    assert args.command == "bench" and args.num_prompts == 3 and args.request_rate == 2.5
    assert parser.parse_args(["bench"]).request_rate == float("inf")
    for bad in (["--request-rate", "0"], ["--dataset", "nope"], ["--endpoint", "/generate"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["bench", *bad])
        assert e.value.code == 2
    # the other subcommands still parse
    assert parser.parse_args(["generate", "--prompt", "hi"]).command == "generate"


def test_bench_validation_and_unreachable_server():
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--random-input-len", "0"], capture_output=True,
                       text=True, timeout=60, cwd=REPO_ROOT)
    assert r.returncode == 2 and "--random-input-len must be > 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--base-url", "http://127.0.0.1:9",
                        "--num-prompts", "1"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert r.returncode == 1 and "cannot list models" in r.stderr and r.stdout == ""


# ---- against the real server ----------------------------------------------------------------------------
def test_bench_random(server, tmp_path):
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    r = bench(server, "--dataset", "random", "--num-prompts", "6", "--random-input-len", "32",
              "--random-output-len", "8", "--max-concurrency", "3", "--seed", "3", "--slo-ttft-ms", "60000",
              "--slo-itl-ms", "60000", "--slo-scale", "0.000001", "1", "--output-file", str(out), "--plot", str(plots))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Serving Benchmark Result" in r.stdout
    positions = [r.stdout.index(label) for label in TABLE_LINES]
    assert positions == sorted(positions), "table lines out of SGLang's order"
    assert table_value(r.stdout, "Successful requests:") == "6"
    assert table_value(r.stdout, "Total generated tokens:") == "48"
    assert table_value(r.stdout, "Max request concurrency:") == "3"
    assert "100%" in r.stderr and "6/6" in r.stderr  # the tqdm bar

    d = json.loads(out.read_text())
    missing = [k for k in JSON_COLUMNS if k not in d]
    assert not missing, missing
    assert d["completed"] == 6 and d["failed"] == 0 and d["not_sent"] == 0
    assert d["total_output_tokens"] == 48 and d["total_input_tokens"] == 6 * 32
    assert d["model"] and d["dataset"] == "random" and d["max_concurrency"] == 3
    assert 0 < d["median_ttft_ms"] <= d["p99_ttft_ms"] and 0 < d["median_itl_ms"] <= d["max_itl_ms"]
    assert d["goodput"] == pytest.approx(d["request_throughput"])  # a 60 s TTFT SLO holds for all
    assert len(d["records"]) == 6
    for rec in d["records"]:
        assert rec["success"] and rec["error"] == "" and rec["usage_reported"]
        assert rec["output_len"] == 8 and rec["prompt_len"] == 32 and rec["finish_reason"] == "length"
        assert rec["ttft"] > 0 and len(rec["itl"]) >= 1 and all(g >= 0 for g in rec["itl"])
        assert rec["e2e"] >= rec["ttft"] + sum(rec["itl"]) - 1e-6
        assert 0 <= rec["start_time"] < d["duration"]
    # at most 3 in flight: the 4th request starts after the first finished
    starts = sorted(rec["start_time"] for rec in d["records"])
    ends = sorted(rec["start_time"] + rec["e2e"] for rec in d["records"])
    assert starts[3] >= ends[0] - 0.05

    # the scale sweep: a millionth of the SLOs holds for none, the SLOs themselves for all
    assert [(x["scale"], x["good_requests"]) for x in d["slo_attainment"]] == [(0.000001, 0), (1, 6)]
    assert "SLO attainment" in r.stdout
    for name in ("ttft.png", "itl.png", "itl_timeline.png", "slo_attainment.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_bench_shared_prefix_reports_the_cache_hit_rate(server, tmp_path):
    """Groups sharing a prefix, one at a time: every prompt after a group's first finds the prefix cached, as
    the server's usage (cached_tokens) says; the table and the JSON carry the hit rate."""
    out = tmp_path / "sp.json"
    r = bench(server, "--dataset", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "3",
              "--system-prompt-len", "48", "--question-len", "4", "--shared-prefix-output-len", "2",
              "--max-concurrency", "1", "--warmup-requests", "0", "--seed", "9", "--output-file", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    # 4 of the 6 prompts hit their group's 48-token prefix (plus the separator), of ~55 prompt tokens each
    assert 0.5 < d["cache_hit_rate"] < 0.7 and float(table_value(r.stdout, "Prefix cache hit rate:")) > 0.5


def test_bench_interference(server, tmp_path):
    out, plots = tmp_path / "i.json", tmp_path / "plots"
    r = bench(server, "--dataset", "interference", "--num-decode-streams", "2", "--decode-input-len", "16",
              "--decode-output-len", "40", "--num-long-prompts", "2", "--long-prompt-len", "512",
              "--long-prompt-output-len", "4", "--long-prompt-rate", "1", "--long-prompt-delay", "0.5",
              "--output-file", str(out), "--plot", str(plots))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Requests of kind 'decode'" in r.stdout and "Requests of kind 'long'" in r.stdout
    d = json.loads(out.read_text())
    assert d["failed"] == 0 and d["dataset"] == "interference"
    longs = [rec for rec in d["records"] if rec["kind"] == "long"]
    decodes = [rec for rec in d["records"] if rec["kind"] == "decode"]
    assert len(longs) == 2 and len(decodes) >= 2
    assert all(rec["output_len"] == 4 and rec["prompt_len"] == 512 for rec in longs)
    assert all(rec["output_len"] == 40 for rec in decodes)
    # long prompts arrive on schedule: 0.5 s, then 1 s apart
    assert longs[0]["start_time"] == pytest.approx(0.5, abs=0.5)
    assert longs[1]["start_time"] - longs[0]["start_time"] == pytest.approx(1.0, abs=0.5)
    # the decode streams were running when the first long prompt came
    assert all(rec["start_time"] < longs[0]["start_time"] for rec in decodes[:2])
    # a 512-token prefill stalls the running decodes: their worst gap dwarfs their typical one
    by_kind = d["by_kind"]
    assert set(by_kind) == {"decode", "long"}
    assert by_kind["decode"]["max_itl_ms"] > 2 * by_kind["decode"]["median_itl_ms"]
    timeline = (plots / "itl_timeline.png").read_bytes()
    assert timeline.startswith(PNG_MAGIC) and len(timeline) > 10_000


def test_bench_short_requests_arrive_while_long_prompts_run(server, tmp_path):
    out = tmp_path / "s.json"
    r = bench(server, "--dataset", "interference", "--num-decode-streams", "1", "--decode-input-len", "16",
              "--decode-output-len", "8", "--num-long-prompts", "2", "--long-prompt-len", "256",
              "--long-prompt-output-len", "2", "--long-prompt-rate", "2", "--long-prompt-delay", "0.3",
              "--short-request-rate", "20", "--short-output-len", "3", "--output-file", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Requests of kind 'short'" in r.stdout
    d = json.loads(out.read_text())
    shorts = [rec for rec in d["records"] if rec["kind"] == "short"]
    longs = [rec for rec in d["records"] if rec["kind"] == "long"]
    assert d["failed"] == 0 and shorts and len(longs) == 2
    assert all(rec["output_len"] == 3 and rec["prompt_len"] == 16 for rec in shorts)
    last_long_done = max(rec["start_time"] + rec["e2e"] for rec in longs)
    # from the first long prompt's time until the last long prompt is answered (a short request's own send may
    # lag its arrival time a little)
    assert all(0.3 <= rec["start_time"] <= last_long_done + 0.5 for rec in shorts)
    assert "short" in d["by_kind"]
    r = bench(server, "--dataset", "interference", "--short-request-rate", "-1")
    assert r.returncode == 2 and "--short-request-rate must be >= 0" in r.stderr


def test_bench_streams_alone_for_a_set_time(server, tmp_path):
    """--num-long-prompts 0 --min-decode-duration: the interference run's baseline (streams, no long prompts)."""
    out = tmp_path / "alone.json"
    r = bench(server, "--dataset", "interference", "--num-decode-streams", "2", "--decode-input-len", "16",
              "--decode-output-len", "4", "--num-long-prompts", "0", "--min-decode-duration", "1.5",
              "--output-file", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    recs = d["records"]
    assert d["failed"] == 0 and {rec["kind"] for rec in recs} == {"decode"} and len(recs) > 2  # restarted
    assert max(rec["start_time"] + rec["e2e"] for rec in recs) >= 1.5  # kept going for 1.5 s
    assert all(rec["start_time"] < 2.0 for rec in recs)  # and no restart after (0.5 s of slack)
    r = bench(server, "--dataset", "interference", "--min-decode-duration", "-1")
    assert r.returncode == 2 and "--min-decode-duration must be >= 0" in r.stderr


def test_library_side_by_side(server):
    common = dict(base_url=server.base_url, num_prompts=2, random_input_len=16, random_output_len=4,
                  warmup_requests=0, progress=False)
    results = asyncio.run(run_benchmarks({
        "completions": BenchConfig(**common),
        "chat": BenchConfig(endpoint="/v1/chat/completions", **common),
    }))
    assert list(results) == ["completions", "chat"]
    for name, res in results.items():
        assert res.label == name and res.summary["completed"] == 2 and res.summary["total_output_tokens"] == 8
    # the chat template adds tokens that the server's usage counts
    assert results["chat"].summary["total_input_tokens"] > results["completions"].summary["total_input_tokens"]
    table = format_table(results)
    header = table.splitlines()[1].split()
    assert header == ["completions", "chat"]
    ttft_line = next(line for line in table.splitlines() if line.startswith("Mean TTFT (ms):"))
    assert len(ttft_line.split()) == 3 + 2  # label words + one value per result
