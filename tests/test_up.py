"""`pdserve up`: starts router + prefill + decode, answers a chat request, `pdserve bench` runs against it, and
SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import argparse
import asyncio

import httpx
import pytest

from pdserve import deploy
from pdserve.config import EngineConfig
from pdserve.engine.client import EngineClient
from tests.conftest import REPO_ROOT, free_port


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry (through /proc) reaches pid."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def test_up_chat_bench_and_clean_sigterm(tmp_path):
    port = free_port()
    log_dir = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--port", str(port), "--transfer-backend", "nixl",
                             "--max-total-tokens", "8192", "--log-dir", str(log_dir)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PDSERVE_STEP_LOG": str(tmp_path / "steps")})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "pdserve up exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in out and "curl" in out
        children = descendants(proc.pid)
        assert len(children) >= 3  # router, prefill, decode (+ engine processes)
        decode_front = next(p for p in children if "--disaggregation-mode decode" in _cmdline(p, full=True))
        decode_engine = next(p for p in descendants(decode_front) if "spawn_main" in _cmdline(p, full=True))
        if len(os.sched_getaffinity(0)) >= 2:  # no other process of the deployment runs on the decode's core
            engine_cpus = os.sched_getaffinity(decode_engine)
            assert engine_cpus and not engine_cpus & os.sched_getaffinity(decode_front)
            for p in children - {decode_engine}:
                try:
                    assert not os.sched_getaffinity(p) & engine_cpus, f"shares the decode core: {_cmdline(p)}"
                except ProcessLookupError:
                    pass  # a short-lived helper process that has exited
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"model": "default", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        result = tmp_path / "bench.json"
        b = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--base-url", f"http://127.0.0.1:{port}",
                            "--num-prompts", "4", "--random-input-len", "32", "--random-output-len", "8",
                            "--max-concurrency", "2", "--output-file", str(result)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stdout + b.stderr
        data = json.loads(result.read_text())
        for key in ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                    "input_throughput", "output_throughput", "concurrency", "mean_ttft_ms", "median_ttft_ms",
                    "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p95_itl_ms", "p99_itl_ms", "max_itl_ms",
                    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_e2e_latency_ms",
                    "median_e2e_latency_ms", "p99_e2e_latency_ms", "goodput"):
            assert key in data, key
        assert data["completed"] == 4 and data["total_output_tokens"] == 32
        assert sorted(os.listdir(log_dir)) == ["decode-0.log", "prefill-0.log", "router.log"]
        # PDSERVE_STEP_LOG: each engine (prefill, decode) logged its model steps: start, wall ms, CPU ms, seqs, ctx
        step_logs = {p.name: [line.split() for line in p.read_text().splitlines()] for p in tmp_path.glob("steps.*")}
        assert len(step_logs) == 2 and all(step_logs.values()), step_logs  # the prefill's and the decode's model steps
        for rows in step_logs.values():
            assert all(len(r) == 5 and float(r[1]) >= 0 and float(r[2]) >= 0 for r in rows)
        decode_rows = step_logs[f"steps.{decode_engine}"]
        assert all(int(r[3]) >= 1 and int(r[4]) >= 32 for r in decode_rows)  # each a step over >= 1 request
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "all processes stopped" in rest
    deadline = time.monotonic() + 10
    while (alive := [p for p in children if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, "left behind: " + "; ".join(_cmdline(p) for p in alive)


def _plan(monkeypatch, tmp_path, cpus: set[int], *argv: str) -> dict[str, deploy.Child]:
    monkeypatch.setattr(deploy.os, "sched_getaffinity", lambda pid: cpus)
    ap = argparse.ArgumentParser()
    deploy.add_up_args(ap)
    return {c.name: c for c in deploy.plan(ap.parse_args(list(argv)), str(tmp_path))}


def test_plan_gives_decode_engines_cores_of_their_own(monkeypatch, tmp_path):
    c = _plan(monkeypatch, tmp_path, {0, 1, 2, 3})
    assert c["prefill-0"].cpus == [0, 1] and not c["prefill-0"].engine_cpus
    dec = c["decode-0"]
    assert dec.engine_cpus == [2, 3] and dec.cpus == [0, 1]  # its front runs beside the prefill
    assert dec.cmd[dec.cmd.index("--engine-cpus") + 1] == "2,3" and dec.cmd[dec.cmd.index("--num-threads") + 1] == "2"
    assert c["router"].cpus == [0, 1]
    c = _plan(monkeypatch, tmp_path, {0, 1, 2, 3}, "--prefill", "2", "--decode", "2")
    assert [c[f"decode-{i}"].engine_cpus for i in range(2)] == [[2], [3]]
    assert c["router"].cpus == c["decode-1"].cpus == [0, 1]
    for argv, cpus in ((["--unified"], {0, 1}), ([], {0})):  # unified, or one core: nothing is pinned apart
        c = _plan(monkeypatch, tmp_path, cpus, *argv)
        assert not any("--engine-cpus" in ch.cmd for ch in c.values()) and c["router"].cpus == []


def test_plan_passes_parallel_layouts(monkeypatch, tmp_path):
    c = _plan(monkeypatch, tmp_path, {0, 1, 2, 3}, "--prefill-tp", "2", "--decode-dp", "2", "--page-size", "16")
    pre, dec = c["prefill-0"].cmd, c["decode-0"].cmd
    assert pre[pre.index("--tp-size") + 1] == "2" and "--dp-size" not in pre
    assert dec[dec.index("--dp-size") + 1] == "2" and "--tp-size" not in dec
    assert pre[pre.index("--num-threads") + 1] == dec[dec.index("--num-threads") + 1] == "1"  # 2 cores / 2 ranks
    assert pre[pre.index("--page-size") + 1] == dec[dec.index("--page-size") + 1] == "16"


def test_plan_kv_aware_turns_on_the_prefills_kv_events(monkeypatch, tmp_path):
    c = _plan(monkeypatch, tmp_path, {0, 1}, "--prefill", "2", "--prefill-policy", "kv_aware", "--dispatch",
              "prefill-first")
    configs = [json.loads(c[f"prefill-{i}"].cmd[c[f"prefill-{i}"].cmd.index("--kv-events-config") + 1])
               for i in range(2)]
    assert all(cfg["enable_kv_cache_events"] for cfg in configs)
    assert configs[0]["endpoint"] != configs[1]["endpoint"]  # a port each
    assert "--kv-events-config" not in c["decode-0"].cmd
    router = c["router"].cmd
    assert router[router.index("--prefill-policy") + 1] == "kv_aware"
    assert router[router.index("--dispatch") + 1] == "prefill-first"
    c = _plan(monkeypatch, tmp_path, {0, 1})
    assert "--kv-events-config" not in c["prefill-0"].cmd and "--prefill-policy" not in c["router"].cmd


def test_engine_cpus_are_checked():
    with pytest.raises(ValueError, match="engine_cpus"):
        EngineConfig(engine_cpus=(1, 1))
    with pytest.raises(ValueError, match="engine_cpus"):
        EngineConfig(engine_cpus=(-1,))
    with pytest.raises(RuntimeError, match="--engine-cpus 4096: cannot pin the engine there"):
        asyncio.run(EngineClient.start(EngineConfig(engine_cpus=(4096,))))


def test_unwritable_step_log_fails_the_start(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_STEP_LOG", str(tmp_path / "missing" / "steps"))  # read by the engine process
    with pytest.raises(RuntimeError, match="PDSERVE_STEP_LOG=.*cannot write the step log"):
        asyncio.run(EngineClient.start(EngineConfig(max_total_tokens=1024)))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int, full: bool = False) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return str(pid)
    return text if full else f"{pid}: {text[:200]}"
