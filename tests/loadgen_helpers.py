"""Drive a `pdserve up` deployment with load generators written elsewhere: NVIDIA aiperf and guidellm, each run
from its own venv under `.venv-tools/<name>` (`make loadgen`), and `pdserve bench` for comparison.

Used by tests/test_load_generators.py (small load, token counts checked against pdserve's own counters) and
benchmarks/load_generators.py (a moderate load, the tools' latency figures side by side).

Everything runs offline: the tokenizer is the model's local HF directory (GET /server_info reports it),
prompts are synthetic, and HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 are set for every tool. aiperf 0.13.0
cannot load a tokenizer from a local directory in offline mode (it resolves the name with
`snapshot_download(local_files_only=True)`, which rejects a path), so it gets the same files as a repo id in a
private Hugging Face cache made of symlinks (`hf_cache_alias`).

Every request asks for a fixed output length: `ignore_eos: true` (aiperf also sends `min_tokens`),
`temperature: 0`, a chat request streamed with `stream_options.include_usage`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import REPO_ROOT, free_port

TOOLS_DIR = os.path.join(REPO_ROOT, ".venv-tools")
TOOL_EXES = {"aiperf": "aiperf", "guidellm": "guidellm"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "num_requests_total", "num_aborted_requests_total")
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds")  # their _sum and _count
UP_READY_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Load:
    """One bounded load: `num_requests` streaming chat requests, `concurrency` in flight, fixed lengths."""

    num_requests: int
    input_len: int
    output_len: int
    concurrency: int


@dataclass
class RequestRow:
    """One request as a tool recorded it. `tool_*` are the tool's own token counts (client-side tokenization
    or the server's usage, whichever the tool reports); `usage_*` the `usage` pdserve answered, as recorded."""

    messages: list[dict[str, str]]
    tool_input_tokens: int
    tool_output_tokens: int
    usage_prompt_tokens: int | None
    usage_completion_tokens: int | None
    error: str | None = None
    output_text: str | None = None  # what the client received, where the tool exports it


@dataclass
class ToolResult:
    tool: str
    cmd: list[str]
    completed: int
    failed: int
    rows: list[RequestRow]
    # the tool's own summary figures (ms, tokens/s, requests/s); None where the tool reports none
    ttft_mean: float | None = None
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    itl_mean: float | None = None
    itl_p50: float | None = None
    output_tok_s: float | None = None
    request_s: float | None = None
    cpu_s: float = 0.0  # CPU time the tool's processes used (user + system)
    extra: dict[str, Any] = field(default_factory=dict)


def tool_exe(tool: str) -> str | None:
    """The tool's console script in its venv, or None when `make loadgen` has not installed it."""
    path = os.path.join(TOOLS_DIR, tool, "bin", TOOL_EXES[tool])
    return path if os.access(path, os.X_OK) else None


def tool_version(tool: str) -> str:
    out = subprocess.run([os.path.join(TOOLS_DIR, tool, "bin", "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({tool!r}))"],
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or "?"


# ---- the deployment -------------------------------------------------------------------------------------

@dataclass
class UpDeployment:
    """`python -m pdserve up` as a child process (its own session): its router's URL, the servers it listed, the
    served model name (the router's GET /v1/models) and the tokenizer directory (the decode's GET /server_info)."""

    proc: subprocess.Popen
    url: str
    log_dir: str
    out_path: str
    model: str = ""
    tokenizer_path: str = ""
    prefill_urls: list[str] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)

    def output(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def logs(self, tail_chars: int = 6000) -> str:
        parts = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name), errors="replace") as f:
                parts.append(f"----- {name} -----\n{f.read()[-tail_chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM `pdserve up` (it stops every child); SIGKILL its group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def start_up(log_dir: str, *extra: str, timeout: float = UP_READY_TIMEOUT_S) -> UpDeployment:
    """Start router + 1 prefill + 1 decode with `pdserve up` and wait until the router serves the model."""
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    out_path = os.path.join(os.path.dirname(log_dir.rstrip("/")) or ".", "pdserve-up.out")
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--port", str(port), "--log-dir", log_dir,
                                 *extra], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    dep = UpDeployment(proc, f"http://127.0.0.1:{port}", log_dir, out_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited with code {proc.returncode}:\n{dep.output()[-4000:]}\n"
                                   f"{dep.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up not ready after {timeout:.0f} s:\n{dep.logs()}")
            try:
                if httpx.get(dep.url + "/readiness", timeout=30).status_code == 200:
                    models = httpx.get(dep.url + "/v1/models", timeout=30).json()["data"]
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1.0)
        dep.model = models[0]["id"]  # the served model name, whatever it is
        # `pdserve up` lists its servers ("  prefill-0  http://127.0.0.1:PORT cpus=[..]") before they are ready
        for role, url in re.findall(r"^\s+(prefill|decode)-\d+\s+(http://\S+)", dep.output(), re.M):
            (dep.prefill_urls if role == "prefill" else dep.decode_urls).append(url)
        if not dep.prefill_urls or not dep.decode_urls:
            raise RuntimeError(f"pdserve up listed no prefill or decode server:\n{dep.output()[-4000:]}")
        dep.tokenizer_path = httpx.get(dep.decode_urls[0] + "/server_info", timeout=30).json()["tokenizer_path"]
    except BaseException:
        dep.stop()
        raise
    return dep


def counters(url: str) -> dict[str, float]:
    """The `sglang:*_total` token and request counters of one worker's GET /metrics, and the _sum / _count of its
    TTFT and ITL histograms (each summed over label sets)."""
    text = httpx.get(url + "/metrics", timeout=60).text
    out = dict.fromkeys(COUNTERS + tuple(f"{h}_{part}" for h in HISTOGRAMS for part in ("sum", "count")), 0.0)
    for line in text.splitlines():
        m = re.match(r"sglang:(\w+?)(?:\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before; token and request counts as ints."""
    return {k: int(round(after[k] - before[k])) if k in COUNTERS else after[k] - before[k] for k in after}


def histogram_mean_ms(delta: dict[str, float], name: str) -> float | None:
    """The mean of what a histogram observed between two scrapes, in ms (None: nothing observed)."""
    n = delta.get(f"{name}_count") or 0
    return 1000.0 * delta[f"{name}_sum"] / n if n else None


def flush_caches(dep: UpDeployment) -> None:
    """Empty every worker's prefix cache, so that one tool's prompts do not warm the next one's."""
    for url in dep.prefill_urls + dep.decode_urls:
        httpx.post(url + "/flush_cache", timeout=60)


def load_generator_cpus() -> set[int] | None:
    """The cores `pdserve up` keeps off its decode engines (prefill, HTTP fronts, router), where the benchmark's
    `--pin` runs the load generators. None: nothing to pin apart (one core)."""
    from pdserve.deploy import split_cpus

    cpus = sorted(os.sched_getaffinity(0))
    pre, dec = split_cpus(cpus, 1, 1)
    return set(pre[0]) if not set(pre[0]) & set(dec[0]) else None


# ---- the chat template ------------------------------------------------------------------------------------

class PromptCounter:
    """Token counts as pdserve computes them: bare text, and a chat through the model's chat template."""

    def __init__(self, tokenizer_path: str):
        from pdserve.model.loader import load_tokenizer

        self.tok = load_tokenizer(tokenizer_path)

    def text(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def chat(self, messages: list[dict[str, str]]) -> int:
        rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tok.encode(rendered, add_special_tokens=False))

    def template_overhead(self) -> int:
        """Tokens the chat template adds around one user message (SmolLM2: a default system prompt, the role
        headers and the assistant prefix)."""
        return self.chat([{"role": "user", "content": ""}])


def _flat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat messages with list-of-parts content (guidellm) joined to one string, as pdserve does."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
        out.append({"role": m["role"], "content": c or ""})
    return out


# ---- the tools -------------------------------------------------------------------------------------------

def _run(cmd: list[str], log_path: str, env: dict[str, str], timeout: float, cpus: set[int] | None) -> float:
    """Run a tool to its end; return the CPU seconds it and the children it waited for used."""
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, preexec_fn=preexec,
                             start_new_session=True)
    try:
        p.wait(timeout=timeout)
    except BaseException as e:  # a timeout or an interrupt: the tool and every process it started go
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(f"{cmd[0]} did not finish in {timeout:.0f} s; output in {log_path}") from None
        raise
    if p.returncode != 0:
        with open(log_path, errors="replace") as f:
            raise RuntimeError(f"{' '.join(cmd)}\nexited with {p.returncode}:\n{f.read()[-6000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def hf_cache_alias(tokenizer_dir: str, cache_dir: str, repo_id: str = "pdserve-local/tokenizer") -> str:
    """A Hugging Face hub cache under `cache_dir` in which `repo_id` (revision main) is the tokenizer directory's
    files (symlinks; weights left out). Lets a tool that only loads tokenizers by repo id in offline mode load a
    local one."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for name in os.listdir(tokenizer_dir):
        if name.endswith((".safetensors", ".bin", ".gguf")):
            continue
        link = os.path.join(snap, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(os.path.abspath(tokenizer_dir), name), link)
    return repo_id


def run_aiperf(dep: UpDeployment, load: Load, out_dir: str, timeout: float = 1800,
               cpus: set[int] | None = None) -> ToolResult:
    """`aiperf profile`: synthetic prompts of exactly input_len tokens (stddev 0), output_len tokens forced with
    ignore_eos + min_tokens + max_completion_tokens, closed loop at `concurrency`, request-count bounded; every
    request's body and stream exported (`--export-level raw`). aiperf counts tokens itself, client-side."""
    os.makedirs(out_dir, exist_ok=True)
    cache = os.path.join(out_dir, "hf-cache")
    tokenizer = hf_cache_alias(dep.tokenizer_path, cache)
    art = os.path.join(out_dir, "artifacts")
    cmd = [tool_exe("aiperf") or "aiperf", "profile", "--model", dep.model, "--url", dep.url,
           "--endpoint-type", "chat", "--streaming", "--tokenizer", tokenizer,
           "--prompt-input-tokens-mean", str(load.input_len), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(load.output_len), "--prompt-output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{load.output_len}",
           "--extra-inputs", "temperature:0",
           "--concurrency", str(load.concurrency), "--request-count", str(load.num_requests),
           "--random-seed", "1", "--request-timeout-seconds", str(int(timeout)),
           "--artifact-dir", art, "--export-level", "raw", "--ui-type", "none", "--workers-max", "2",
           "--record-processor-service-count", "1", "--no-server-metrics", "--no-gpu-telemetry"]
    env = {**os.environ, **OFFLINE_ENV, "HF_HUB_CACHE": cache, "HF_HOME": os.path.join(out_dir, "hf-home")}
    cpu_s = _run(cmd, os.path.join(out_dir, "aiperf.log"), env, timeout, cpus)
    res = parse_aiperf(art, cmd)
    res.cpu_s = cpu_s
    return res


def _streamed_text(responses: list[dict[str, Any]]) -> str:
    """The content deltas of a recorded chat stream (aiperf's raw SSE packets), joined."""
    parts = []
    for resp in responses:
        for packet in resp.get("packets") or []:
            if packet.get("name") != "data" or not packet.get("value", "").startswith("{"):
                continue
            for choice in json.loads(packet["value"]).get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def parse_aiperf(art: str, cmd: list[str]) -> ToolResult:
    """profile_export_aiperf.json (summary), profile_export.jsonl (each request's metrics) joined by request id
    to profile_export_raw.jsonl (each request's body and the SSE stream it got)."""
    with open(os.path.join(art, "profile_export_aiperf.json")) as f:
        summary = json.load(f)
    with open(os.path.join(art, "profile_export_raw.jsonl")) as f:
        raw = {r["metadata"]["x_request_id"]: r for r in map(json.loads, filter(str.strip, f))}
    rows = []
    with open(os.path.join(art, "profile_export.jsonl")) as f:
        for rec in map(json.loads, filter(str.strip, f)):
            m = rec.get("metrics") or {}

            def val(name: str) -> Any:
                return (m.get(name) or {}).get("value")

            err = rec.get("error")
            r = raw[rec["metadata"]["x_request_id"]]
            rows.append(RequestRow(_flat_messages(r["payload"]["messages"]), val("input_sequence_length") or 0,
                                   val("output_sequence_length") or 0, val("usage_prompt_tokens"),
                                   val("usage_completion_tokens"), json.dumps(err) if err else None,
                                   _streamed_text(r.get("responses") or [])))

    def stat(metric: str, key: str) -> float | None:
        return (summary.get(metric) or {}).get(key)

    errors = sum(int(e.get("count", 1)) for e in summary.get("error_summary") or [])
    return ToolResult("aiperf", cmd, completed=int(stat("request_count", "avg") or 0), failed=errors, rows=rows,
                      ttft_mean=stat("time_to_first_token", "avg"), ttft_p50=stat("time_to_first_token", "p50"),
                      ttft_p99=stat("time_to_first_token", "p99"), itl_mean=stat("inter_token_latency", "avg"),
                      itl_p50=stat("inter_token_latency", "p50"),
                      output_tok_s=stat("output_token_throughput", "avg"),
                      request_s=stat("request_throughput", "avg"),
                      extra={"was_cancelled": summary.get("was_cancelled"), "is_complete": summary.get("is_complete"),
                             "error_summary": summary.get("error_summary")})


def run_guidellm(dep: UpDeployment, load: Load, out_dir: str, timeout: float = 1800,
                 cpus: set[int] | None = None) -> ToolResult:
    """`guidellm run`: synthetic_text data (prompt_tokens / output_tokens; guidellm itself sends ignore_eos and
    max_completion_tokens for a fixed output length), the `concurrent` profile, a max_requests constraint."""
    os.makedirs(out_dir, exist_ok=True)
    result_path = os.path.join(out_dir, "benchmarks.json")
    cmd = [tool_exe("guidellm") or "guidellm", "run",
           "--backend", f"kind=openai_http,target={dep.url},model={dep.model},request_format=/v1/chat/completions,"
                        f"timeout={int(timeout)},extras.body.temperature=0",
           "--profile", f"kind=concurrent,streams={load.concurrency}",
           "--constraint", f"kind=max_requests,count={load.num_requests}",
           "--tokenizer", f"kind=hf_auto,model={dep.tokenizer_path}",
           "--data", f"kind=synthetic_text,prompt_tokens={load.input_len},output_tokens={load.output_len}",
           "--seed", "kind=static,value=1",
           "--output", f"kind=json,path={result_path}", "--disable-progress"]
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": os.path.join(out_dir, "hf-home")}
    cpu_s = _run(cmd, os.path.join(out_dir, "guidellm.log"), env, timeout, cpus)
    res = parse_guidellm(result_path, cmd)
    res.cpu_s = cpu_s
    return res


def parse_guidellm(path: str, cmd: list[str]) -> ToolResult:
    """benchmarks.json: one benchmark; every request's body, status and token counts (the server's usage, which
    guidellm prefers to its own tokenization), and the summary distributions."""
    with open(path) as f:
        bench = json.load(f)["benchmarks"][0]
    reqs = bench["requests"]
    rows = []
    for status in ("successful", "errored", "incomplete"):
        for r in reqs.get(status) or []:
            body = json.loads(r["request_args"])["body"]
            inp, out = r.get("input_metrics") or {}, r.get("output_metrics") or {}
            err = None if status == "successful" else f"{status}: {r.get('info', {}).get('error')}"
            rows.append(RequestRow(_flat_messages(body["messages"]), inp.get("text_tokens") or 0,
                                   out.get("text_tokens") or 0, inp.get("text_tokens"), out.get("text_tokens"), err,
                                   r.get("output")))
    metrics = bench["metrics"]

    def ok(metric: str) -> dict[str, Any]:
        return (metrics.get(metric) or {}).get("successful") or {}

    return ToolResult("guidellm", cmd, completed=len(reqs.get("successful") or []),
                      failed=len(reqs.get("errored") or []) + len(reqs.get("incomplete") or []), rows=rows,
                      ttft_mean=ok("time_to_first_token_ms").get("mean"),
                      ttft_p50=ok("time_to_first_token_ms").get("median"),
                      ttft_p99=(ok("time_to_first_token_ms").get("percentiles") or {}).get("p99"),
                      itl_mean=ok("inter_token_latency_ms").get("mean"),
                      itl_p50=ok("inter_token_latency_ms").get("median"),
                      output_tok_s=ok("output_tokens_per_second").get("mean"),
                      request_s=ok("requests_per_second").get("mean"),
                      extra={"request_totals": metrics.get("request_totals"), "duration": bench.get("duration")})


def run_pdserve_bench(dep: UpDeployment, load: Load, out_dir: str, timeout: float = 1800,
                      cpus: set[int] | None = None) -> ToolResult:
    """`pdserve bench` on the same load: random prompts, chat endpoint, ignore_eos, no warmup request."""
    os.makedirs(out_dir, exist_ok=True)
    result_path = os.path.join(out_dir, "pdserve-bench.json")
    cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", dep.url, "--endpoint", "/v1/chat/completions",
           "--model", dep.model, "--dataset", "random", "--num-prompts", str(load.num_requests),
           "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
           "--max-concurrency", str(load.concurrency), "--warmup-requests", "0", "--seed", "1",
           "--timeout", str(int(timeout)), "--output-file", result_path, "--disable-tqdm"]
    cpu_s = _run(cmd, os.path.join(out_dir, "pdserve-bench.log"), {**os.environ, **OFFLINE_ENV}, timeout, cpus)
    with open(result_path) as f:
        s = json.load(f)  # the summary keys at the top level, per-request records beside them
    return ToolResult("pdserve bench", cmd, completed=int(s["completed"]), failed=int(s.get("failed") or 0), rows=[],
                      ttft_mean=s["mean_ttft_ms"], ttft_p50=s["median_ttft_ms"], ttft_p99=s["p99_ttft_ms"],
                      itl_mean=s["mean_itl_ms"], itl_p50=s["median_itl_ms"], output_tok_s=s["output_throughput"],
                      request_s=s["request_throughput"], cpu_s=cpu_s,
                      extra={"total_input_tokens": s["total_input_tokens"],
                             "total_output_tokens": s["total_output_tokens"]})


RUNNERS = {"aiperf": run_aiperf, "guidellm": run_guidellm}
