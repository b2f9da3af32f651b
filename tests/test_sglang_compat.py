"""What SGLang's ecosystem reads from a worker: metric names, types and labels as SGLang's collector defines them;
/v1/models (owned_by, the model's name); SMG's /v1/loads; /start_profile and /stop_profile writing torch traces;
`pdserve bench --profile --pd-separated`; SGLang's list-form PD fields; --prefill-only / --decode-only; the PD
router's and mini_lb's /get_server_info shape."""

from __future__ import annotations

import concurrent.futures as cf
import glob
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess, free_port, spawn, start_server, stop_server, wait_ok
from tests.pd_helpers import SIGNED, Prefill, load, start_decode, stop_all

SCHED = ("model_name", "engine_type", "tp_rank", "pp_rank")
TOKENIZER = ("model_name", "engine_type")
# Taken from SGLang's metrics collector (python/sglang/srt/metrics/collector.py: SchedulerMetricsCollector with
# labels model_name, engine_type, tp_rank, pp_rank; TokenizerMetricsCollector with model_name, engine_type):
# (name as scraped, type, label names). The list: the scheduler gauges and PD ones, the request side.
SGLANG_REFERENCE = [
    *((f"sglang:{n}", "gauge", SCHED) for n in (
        "num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage", "max_total_num_tokens",
        "gen_throughput", "cache_hit_rate", "num_retracted_reqs", "utilization", "engine_startup_time",
        "num_prefill_prealloc_queue_reqs", "num_prefill_inflight_queue_reqs", "num_decode_prealloc_queue_reqs",
        "num_decode_transfer_queue_reqs", "kv_transfer_speed_gb_s", "kv_transfer_latency_ms",
        "kv_transfer_bootstrap_ms", "kv_transfer_alloc_ms", "kv_transfer_total_mb")),
    ("sglang:num_bootstrap_failed_reqs_total", "counter", SCHED),
    ("sglang:num_transfer_failed_reqs_total", "counter", SCHED),
    ("sglang:num_retracted_requests_total", "counter", SCHED),
    ("sglang:queue_time_seconds", "histogram", SCHED),
    *((f"sglang:{n}_total", "counter", TOKENIZER) for n in (
        "prompt_tokens", "generation_tokens", "cached_tokens", "num_requests", "num_aborted_requests")),
    ("sglang:time_to_first_token_seconds", "histogram", TOKENIZER),
    ("sglang:inter_token_latency_seconds", "histogram", TOKENIZER),
    ("sglang:e2e_request_latency_seconds", "histogram", TOKENIZER),
]
GREEDY = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


def families(base_url: str) -> dict[str, tuple[str, set[tuple[str, ...]], list]]:
    """name as scraped -> (type, label-name sets of its samples, samples)."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text):
        name = fam.name + ("_total" if fam.type == "counter" else "")
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        labels = {tuple(sorted(k for k in s.labels if k not in ("le", "quantile"))) for s in samples}
        out[name] = (fam.type, labels, samples)
    return out


def value(fams: dict, name: str) -> float:
    return sum(s.value for s in fams[name][2])


def test_metric_names_types_and_labels_match_sglang(server):
    assert httpx.post(server.base_url + "/generate", json=GREEDY, timeout=120).status_code == 200
    fams = families(server.base_url)
    for name, kind, labels in SGLANG_REFERENCE:
        assert name in fams, f"{name} is not exported"
        got_kind, got_labels, samples = fams[name]
        assert got_kind == kind, (name, got_kind)
        assert got_labels == {tuple(sorted(labels))}, (name, got_labels)
        assert {s.labels["engine_type"] for s in samples} == {"unified"}
        assert {s.labels["model_name"] for s in samples} == {"SmolLM2-135M-Instruct"}
    assert value(fams, "sglang:num_requests_total") >= 1 and value(fams, "sglang:max_total_num_tokens") > 0
    assert fams["sglang:queue_time_seconds"][2], "the queue-time histogram has no samples"


def test_models_owned_by_sglang_under_the_models_name(server):
    models = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["owned_by"]) for m in models] == [("SmolLM2-135M-Instruct", "sglang")]
    info = httpx.get(server.base_url + "/server_info", timeout=30).json()
    assert info["served_model_name"] == "SmolLM2-135M-Instruct" and info["model_path"].endswith(".gguf")
    for model in ("SmolLM2-135M-Instruct", info["model_path"]):  # the path still works
        body = {"model": model, "prompt": "Hello", "max_tokens": 2}
        r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["model"] == "SmolLM2-135M-Instruct", r.text


def test_gateway_headers_are_accepted_and_the_request_id_echoed(server):
    headers = {"X-Request-Id": "chatcmpl-smg-0123", "X-SMG-Routing-Key": "tenant-a",
               "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers,
                   timeout=120)
    assert r.status_code == 200 and r.headers["x-request-id"] == "chatcmpl-smg-0123", r.text
    r = httpx.post(server.base_url + "/generate", json={**GREEDY, "stream": True}, headers=headers, timeout=120)
    assert r.status_code == 200 and r.headers["x-request-id"] == "chatcmpl-smg-0123"
    r = httpx.get(server.base_url + "/health", headers={"X-Request-Id": "x" * 300}, timeout=30)
    assert r.status_code == 200 and "x-request-id" not in r.headers  # oversized: not echoed


def test_v1_loads_in_smg_shape(server):
    body = httpx.get(server.base_url + "/v1/loads?include=core,disagg,queues,memory", timeout=30).json()
    assert body["dp_rank_count"] == 1 and body["version"] and body["timestamp"]
    rank = body["loads"][0]
    for key in ("dp_rank", "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens",
                "max_total_num_tokens", "token_usage", "gen_throughput", "cache_hit_rate", "utilization",
                "max_running_requests"):
        assert key in rank, key
    assert rank["max_total_num_tokens"] > 0 and rank["max_running_requests"] > 0
    assert rank["memory"]["kv_cache_gb"] > 0 and rank["memory"]["weight_gb"] > 0
    assert set(rank["queues"]) == {"waiting", "grammar", "paused", "retracted"} and rank["disagg_mode"] == "null"
    assert set(body["aggregate"]) >= {"total_running_reqs", "total_waiting_reqs", "avg_token_usage"}
    core = httpx.get(server.base_url + "/v1/loads", timeout=30).json()["loads"][0]
    assert "memory" not in core and "disagg_mode" not in core
    r = httpx.get(server.base_url + "/v1/loads?include=everything", timeout=30)
    assert r.status_code == 400 and "include" in r.json()["error"]["message"]


def _trace_events(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def test_start_and_stop_profile_write_torch_traces(server):
    with tempfile.TemporaryDirectory() as out_dir:
        assert httpx.post(server.base_url + "/stop_profile", timeout=30).status_code == 400  # nothing to stop
        r = httpx.post(server.base_url + "/start_profile", json={"output_dir": out_dir, "num_steps": 3}, timeout=30)
        assert r.status_code == 200 and r.text.startswith("Start profiling."), r.text
        again = httpx.post(server.base_url + "/start_profile", json={"output_dir": out_dir}, timeout=30)
        assert again.status_code == 400 and "already" in again.json()["error"]["message"]
        assert httpx.post(server.base_url + "/generate", json=GREEDY, timeout=120).status_code == 200
        deadline = time.monotonic() + 60  # stops by itself after 3 model steps, then writes the trace
        while time.monotonic() < deadline and not glob.glob(f"{out_dir}/*-TP-0.trace.json.gz"):
            time.sleep(0.2)
        [trace] = glob.glob(f"{out_dir}/*-TP-0.trace.json.gz")
        steps = [e for e in _trace_events(trace) if e.get("name") == "pdserve_step" and e.get("ph") == "X"]
        assert len(steps) >= 3

        # By stage, started with GET and no body (defaults), stopped by /stop_profile: EXTEND and DECODE traces.
        body = {"output_dir": out_dir, "profile_by_stage": True, "profile_prefix": "staged", "activities": ["CPU"]}
        assert httpx.post(server.base_url + "/start_profile", json=body, timeout=30).status_code == 200
        assert httpx.post(server.base_url + "/generate", json=GREEDY, timeout=120).status_code == 200
        r = httpx.get(server.base_url + "/stop_profile", timeout=120)
        assert r.status_code == 200, r.text
        staged = sorted(os.path.basename(p) for p in glob.glob(f"{out_dir}/staged-*"))
        assert [p.rsplit("-", 1)[1] for p in staged] == ["DECODE.trace.json.gz", "EXTEND.trace.json.gz"], staged
        for path in glob.glob(f"{out_dir}/staged-*"):
            assert any(e.get("name") == "pdserve_step" for e in _trace_events(path)), path
        bad = httpx.post(server.base_url + "/start_profile", json={"activities": ["TPU"]}, timeout=30)
        assert bad.status_code == 400 and "TPU" in bad.json()["error"]["message"]


# ---- PD: labels, transfer figures, list-form fields, aliases, profiling both workers ------------------------
@pytest.fixture(scope="module")
def pd_pair():
    """Started with SMG's spelling of the modes (--prefill-only / --decode-only)."""
    bp = free_port()
    prefill_args = ["--num-threads", "1", "--prefill-only", "--disaggregation-transfer-backend", "nixl",
                    "--disaggregation-bootstrap-port", str(bp), "--max-total-tokens", "8192"]
    prefill = Prefill(start_server(prefill_args, env=SIGNED), bp, prefill_args, SIGNED)
    decode = None
    try:
        decode = start_decode("nixl", extra=["--decode-only"])
        yield prefill, decode
    finally:
        stop_all(prefill, *(d for d in (decode,) if d is not None))


def both(prefill: Prefill, decode: ServerProcess, path: str, body: dict) -> tuple[httpx.Response, httpx.Response]:
    with cf.ThreadPoolExecutor(2) as ex:
        fp = ex.submit(httpx.post, prefill.server.base_url + path, json=body, timeout=120)
        fd = ex.submit(httpx.post, decode.base_url + path, json=body, timeout=120)
        return fp.result(), fd.result()


def test_pd_metrics_labels_and_transfer_figures(pd_pair, server):
    prefill, decode = pd_pair
    info = [httpx.get(s.base_url + "/server_info", timeout=30).json()["disaggregation_mode"]
            for s in (prefill.server, decode)]
    assert info == ["prefill", "decode"]
    body = {**GREEDY, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": random.getrandbits(63)}
    rp, rd = both(prefill, decode, "/generate", body)
    assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
    unified = httpx.post(server.base_url + "/generate", json=GREEDY, timeout=120).json()["text"]
    assert rd.json()["text"] == unified
    for srv, engine_type in ((prefill.server, "prefill"), (decode, "decode")):
        fams = families(srv.base_url)
        for name, _, _ in SGLANG_REFERENCE:
            assert {s.labels["engine_type"] for s in fams[name][2]} == {engine_type}, name
        assert value(fams, "sglang:kv_transfer_total_mb") > 0 and value(fams, "sglang:kv_transfer_latency_ms") > 0
        assert value(fams, "sglang:num_transfer_failed_reqs_total") == 0
        loads = httpx.get(srv.base_url + "/v1/loads?include=disagg", timeout=30).json()["loads"][0]
        assert loads["disagg_mode"] == engine_type and loads["kv_transfer_latency_ms"] > 0


def test_pd_list_form_bootstrap_fields(pd_pair, server):
    """SGLang's routers send PD fields as lists: one room per choice (chat with n = 2) or a one-entry list."""
    prefill, decode = pd_pair
    chat = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0}
    rooms = [random.getrandbits(63) for _ in range(2)]
    body = {**chat, "n": 2, "bootstrap_host": ["127.0.0.1"] * 2, "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": rooms}
    rp, rd = both(prefill, decode, "/v1/chat/completions", body)
    assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
    want = httpx.post(server.base_url + "/v1/chat/completions", json=chat, timeout=120).json()
    got = [c["message"]["content"] for c in rd.json()["choices"]]
    assert got == [want["choices"][0]["message"]["content"]] * 2
    single = {**GREEDY, "bootstrap_host": ["127.0.0.1"], "bootstrap_port": [prefill.bootstrap_port],
              "bootstrap_room": [random.getrandbits(63)]}
    rp, rd = both(prefill, decode, "/generate", single)
    assert rd.status_code == 200 and rd.json()["text"] == httpx.post(
        server.base_url + "/generate", json=GREEDY, timeout=120).json()["text"]
    mismatched = {**chat, "n": 2, "bootstrap_host": "127.0.0.1", "bootstrap_room": rooms[:1] * 3}
    r = httpx.post(decode.base_url + "/v1/chat/completions", json=mismatched, timeout=30)
    assert r.status_code == 400 and "bootstrap_room" in r.text
    assert load(decode)["num_reqs"] == 0 and load(prefill.server)["num_reqs"] == 0


def test_bench_profile_pd_separated(pd_pair):
    """`pdserve bench --profile --pd-separated` through the router: each worker writes its own trace."""
    prefill, decode = pd_pair
    args = ["--pd-disaggregation", "--prefill", prefill.server.base_url, str(prefill.bootstrap_port),
            "--decode", decode.base_url]
    router = wait_ok(spawn("pdserve.launch_router", args, log_prefix="pdserve-router-"), "/readiness", 120, "router")
    try:
        info = httpx.get(router.base_url + "/get_server_info", timeout=30).json()
        assert set(info) >= {"prefill", "decode", "internal_states"} and len(info["internal_states"]) == 1
        assert info["decode"][0]["internal_states"][0]["dp_rank"] == 0
        with tempfile.TemporaryDirectory() as out_dir:
            cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", router.base_url, "--num-prompts", "3",
                   "--random-input-len", "16", "--random-output-len", "4", "--disable-tqdm", "--profile",
                   "--pd-separated", "--profile-prefill-url", prefill.server.base_url, "--profile-decode-url",
                   decode.base_url, "--profile-output-dir", out_dir, "--profile-activities", "CPU"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout + r.stderr
            traces = sorted(os.path.basename(p).split("-")[0] for p in glob.glob(f"{out_dir}/*-TP-0.trace.json.gz"))
            assert traces == ["decode", "prefill"], (traces, r.stderr)  # one trace per worker, named by role
        with tempfile.TemporaryDirectory() as out_dir:  # the router's own profile routes fan out to every worker
            body = {"output_dir": out_dir, "activities": ["CPU"], "profile_prefix": "routed"}
            r = httpx.post(router.base_url + "/start_profile", json=body, timeout=60)
            assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
            assert httpx.post(router.base_url + "/generate", json=GREEDY, timeout=120).status_code == 200
            r = httpx.post(router.base_url + "/stop_profile", timeout=300)
            assert r.status_code == 200, r.text
            assert len(glob.glob(f"{out_dir}/routed-*-TP-0.trace.json.gz")) == 2
            only = {"output_dir": out_dir, "url": decode.base_url, "activities": ["CPU"]}
            r = httpx.post(router.base_url + "/start_profile", json=only, timeout=60)
            assert r.status_code == 200 and [x["url"] for x in r.json()["results"]] == [decode.base_url], r.text
            assert httpx.get(router.base_url + "/stop_profile", timeout=300).status_code == 500  # prefill: not started
    finally:
        stop_server(router)
