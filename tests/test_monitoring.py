"""docs/monitoring against a real Prometheus: `pdserve up` (router, 1 prefill, 1 decode) serves a few requests, a
`prometheus` process scrapes it with a config derived from docs/monitoring/prometheus.yaml (the test's ports, a 1 s
scrape interval), and every panel query of the Grafana dashboard returns data; scraped series carry the labels of
the metrics contract (SGLang's names and labels, engine_type prefill/decode)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="no `prometheus` binary on PATH (`make setup` "
                                      "installs the Debian package prometheus with apt-get)")

MONITORING = os.path.join(REPO_ROOT, "docs", "monitoring")
DASHBOARD = os.path.join(MONITORING, "grafana", "dashboards", "pdserve-dashboard.json")
MODEL_NAME = "SmolLM2-135M-Instruct"
RATE_INTERVAL = "5m"  # $__rate_interval: Prometheus holds only this test's samples, all within it
NUM_REQUESTS = 8

# The metrics contract (pdserve/server/metrics.py): series of every worker and the labels each carries.
SCHEDULER_LABELS = {"model_name", "engine_type", "tp_rank", "pp_rank"}
REQUEST_LABELS = {"model_name", "engine_type"}
SCHEDULER_METRICS = [f"sglang:{n}" for n in (
    "num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage", "max_total_num_tokens", "gen_throughput",
    "cache_hit_rate", "num_retracted_reqs", "utilization", "engine_startup_time", "num_prefill_prealloc_queue_reqs",
    "num_prefill_inflight_queue_reqs", "num_decode_prealloc_queue_reqs", "num_decode_transfer_queue_reqs",
    "kv_transfer_speed_gb_s", "kv_transfer_latency_ms", "kv_transfer_bootstrap_ms", "kv_transfer_alloc_ms",
    "kv_transfer_total_mb", "num_bootstrap_failed_reqs_total", "num_transfer_failed_reqs_total",
    "num_retracted_requests_total", "queue_time_seconds_bucket")]
REQUEST_METRICS = [f"sglang:{n}" for n in (
    "prompt_tokens_total", "generation_tokens_total", "cached_tokens_total", "num_requests_total",
    "num_aborted_requests_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
    "e2e_request_latency_seconds_bucket")]


@dataclass
class Stack:
    prom: str  # Prometheus base URL
    router: str  # the deployment's router base URL
    workers: list[dict]  # the router's /workers list


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.status_code} {r.text[:500]}"
    return body["data"]["result"]


def series(prom: str, match: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/series", params={"match[]": match}, timeout=30)
    assert r.status_code == 200, r.text[:500]
    return r.json()["data"]


def wait_for(what: str, check, timeout: float, log_path: str | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, KeyError, ValueError) as e:
            last = e
        time.sleep(0.5)
    tail = open(log_path, errors="replace").read()[-5000:] if log_path else ""
    raise AssertionError(f"{what} not reached in {timeout:.0f} s (last: {last!r})\n{tail}")


def start_up(tmp_path) -> tuple[subprocess.Popen, str]:
    """`pdserve up` with the router on a free port; returns once it printed that everything is ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--port", str(port), "--transfer-backend", "nixl",
                             "--max-total-tokens", "8192", "--log-dir", str(tmp_path / "logs")], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            stop_up(proc)
            raise AssertionError("pdserve up exited early:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("Ctrl-C stops everything"):
            return proc, f"http://127.0.0.1:{port}"
    stop_up(proc)
    raise AssertionError("pdserve up not ready:\n" + "".join(lines))


def stop_up(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


def prometheus_config(tmp_path, router: str, workers: list[dict]) -> str:
    """docs/monitoring/prometheus.yaml with this deployment's router and a 1 s scrape interval, written to tmp_path
    beside the workers' file its file_sd job reads (written as the config's comments say, from /workers)."""
    with open(os.path.join(MONITORING, "prometheus.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    workers_file = tmp_path / "pdserve-workers.json"
    workers_file.write_text(json.dumps([{"targets": [w["url"].split("://", 1)[1]], "labels": {"role": w["role"]}}
                                        for w in workers]))
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"pdserve-router", "pdserve-workers"}, jobs
    jobs["pdserve-router"]["static_configs"] = [{"targets": [router.split("://", 1)[1]]}]
    assert [f for sd in jobs["pdserve-workers"]["file_sd_configs"] for f in sd["files"]] == ["pdserve-workers*.json"]
    path = tmp_path / "prometheus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def send_requests(router: str) -> None:
    """A handful of small greedy requests through the router: chat, streamed chat and /generate."""
    with httpx.Client(base_url=router, timeout=120) as c:
        for i in range(NUM_REQUESTS):
            content = f"Name {i + 1} colours of the rainbow."
            if i % 4 == 3:
                r = c.post("/generate", json={"text": content, "sampling_params": {"temperature": 0,
                                                                                   "max_new_tokens": 8}})
                assert r.status_code == 200 and r.json()["text"], r.text
                continue
            body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                    "temperature": 0, "stream": i % 4 == 2}
            if body["stream"]:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    assert any(line.startswith("data: [DONE]") for line in r.iter_lines())
            else:
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("monitoring")
    up, router = start_up(tmp_path)
    prom_proc = None
    try:
        workers = httpx.get(router + "/workers", timeout=30).json()["workers"]
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"], workers
        prom = f"http://127.0.0.1:{free_port()}"
        log_path = str(tmp_path / "prometheus.log")
        with open(log_path, "w") as log:
            prom_proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={prometheus_config(tmp_path, router, workers)}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={prom.split('://', 1)[1]}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path), start_new_session=True)

        def targets_up():
            if prom_proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({prom_proc.returncode}):\n{open(log_path).read()[-5000:]}")
            active = httpx.get(prom + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            return len(active) == 3 and all(t["health"] == "up" for t in active) and active

        active = wait_for("all 3 Prometheus targets up", targets_up, 120, log_path)
        assert {t["labels"]["job"] for t in active} == {"pdserve-router", "pdserve-workers"}
        send_requests(router)

        def scraped_after_requests():  # Prometheus holds the counters' values after the requests
            routed = query(prom, "sum(pdserve_router_requests_total)")
            per_worker = query(prom, f"sglang:num_requests_total >= {NUM_REQUESTS}")
            return routed and float(routed[0]["value"][1]) >= NUM_REQUESTS and len(per_worker) == 2

        wait_for("the requests in Prometheus", scraped_after_requests, 120, log_path)
        yield Stack(prom, router, workers)
    finally:
        if prom_proc is not None:
            os.killpg(prom_proc.pid, signal.SIGTERM)
            try:
                prom_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(prom_proc.pid, signal.SIGKILL)
                prom_proc.wait(timeout=10)
        stop_up(up)


_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


def resolve_variables(prom: str, dashboard: dict) -> dict[str, str]:
    """Each dashboard variable's value as Grafana would substitute it: `All` (allValue) for multi-value ones, the
    first value otherwise. Every query variable must list at least one value (its dropdown is not empty)."""
    values = {"__rate_interval": RATE_INTERVAL}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
        m = _LABEL_VALUES.match(substitute(q, values))
        assert m, f"variable {var['name']}: only label_values(metric, label) is understood: {q}"
        found = sorted({s[m.group(2)] for s in series(prom, m.group(1)) if m.group(2) in s})
        assert found, f"variable {var['name']}: {q} lists no values"
        values[var["name"]] = var["allValue"] if var.get("includeAll") else found[0]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), expr)
    assert "$" not in out, f"unresolved variable in {out}"
    return out


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


@needs_prometheus
def test_every_dashboard_panel_query_returns_data(stack: Stack):
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    values = resolve_variables(stack.prom, dashboard)
    assert values["model_name"] == MODEL_NAME, values
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 20 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    failures, checked = [], 0
    for panel in panels:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            expr = substitute(t["expr"], values)
            result = query(stack.prom, expr)
            checked += 1
            if not result:
                failures.append(f"{panel['title']!r}: no series: {expr}")
            elif not _finite(result):  # e.g. a quantile over buckets that saw no observation: NaN only
                failures.append(f"{panel['title']!r}: no finite value: {expr} -> {result}")
    assert not failures, f"{len(failures)} of {checked} panel queries without data:\n" + "\n".join(failures)
    titles = {p["title"] for p in panels}
    for needed in ("End-to-End Request Latency", "Time-To-First-Token Latency", "Num Running Requests",
                   "Token Generation Throughput (Tokens / S)", "Cache Hit Rate", "Number Queued Requests",
                   "KV Transfer Speed", "KV Transfer Latency", "PD Queue Depths", "Bootstrap / Transfer Failures",
                   "Router Requests"):
        assert needed in titles, needed


@needs_prometheus
def test_scraped_series_carry_the_contract_labels(stack: Stack):
    by_name: dict[str, list[dict]] = {}
    for s in series(stack.prom, '{__name__=~"sglang:.+"}'):
        by_name.setdefault(s["__name__"], []).append(s)
    missing = [n for n in SCHEDULER_METRICS + REQUEST_METRICS if n not in by_name]
    assert not missing, f"not scraped: {missing}"
    worker_instances = {w["url"].split("://", 1)[1] for w in stack.workers}
    for names, labels in ((SCHEDULER_METRICS, SCHEDULER_LABELS), (REQUEST_METRICS, REQUEST_LABELS)):
        for name in names:
            for s in by_name[name]:
                assert labels <= set(s), f"{name} lacks {labels - set(s)}: {s}"
                assert s["model_name"] == MODEL_NAME and s["job"] == "pdserve-workers", s
                assert s["instance"] in worker_instances, s
            if name.startswith(("sglang:num_prefill_", "sglang:num_decode_")):
                continue  # a PD queue may be exported by its own side only
            assert {s["engine_type"] for s in by_name[name]} == {"prefill", "decode"}, (name, by_name[name])
    for s in by_name["sglang:num_running_reqs"]:
        assert s["tp_rank"] == "0" and s["pp_rank"] == "0", s
    # The file_sd label the docs write, and the router's per-worker series: one per worker, both healthy.
    roles = {s["instance"]: s["role"] for s in by_name["sglang:num_requests_total"]}
    assert roles == {w["url"].split("://", 1)[1]: w["role"] for w in stack.workers}
    healthy = query(stack.prom, "pdserve_router_worker_healthy")
    assert sorted((s["metric"]["role"], s["metric"]["worker"], s["value"][1]) for s in healthy) == sorted(
        (w["role"], w["url"], "1") for w in stack.workers)
    routes = {s["metric"]["route"] for s in query(stack.prom, "pdserve_router_requests_total")}
    assert {"chat", "generate"} <= routes, routes
    # The request counters count exactly what was sent: every request ran on the prefill and on the decode.
    totals = {s["metric"]["engine_type"]: float(s["value"][1]) for s in query(stack.prom, "sglang:num_requests_total")}
    assert totals == {"prefill": NUM_REQUESTS, "decode": NUM_REQUESTS}, totals


def test_grafana_provisioning_matches_the_compose_mounts():
    """The provisioning files point where docker-compose.yaml mounts things, and every panel reads the dashboard's
    datasource variable (so an imported dashboard works with any Prometheus datasource)."""
    def load(*parts):
        with open(os.path.join(MONITORING, *parts)) as f:
            return yaml.safe_load(f)

    compose = load("docker-compose.yaml")["services"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load("grafana", "provisioning", "dashboards", "pdserve.yaml")["providers"]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    (source,) = load("grafana", "provisioning", "datasources", "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090" and source["isDefault"]
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    assert dashboard["templating"]["list"][0] == {**dashboard["templating"]["list"][0], "name": "datasource",
                                                  "type": "datasource", "query": "prometheus"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
