"""`GET /v1/loads`: the worker load report SMG polls (its `WorkerLoadResponse`: one `SchedulerLoadSnapshot` per dp
rank plus an aggregate), built from the same per-rank figures as /metrics (server/metrics.EngineCollector).

`?include=core,disagg,queues,memory` (comma separated; `all` for every section; default `core`; `spec` and `lora`
are accepted and empty: pdserve has neither speculative decoding nor LoRA)."""

from __future__ import annotations

import datetime
import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdserve import __version__
from pdserve.engine.stats import EngineStats, PDStats
from pdserve.server.metrics import EngineCollector

LOAD_SECTIONS = ("core", "disagg", "queues", "memory", "spec", "lora")


def parse_include(raw: str | None) -> set[str]:
    """The sections asked for (comma separated); ValueError names an unknown one."""
    return include_sections(p.strip() for p in (raw or "core").split(","))


def include_sections(names: Iterable[str]) -> set[str]:
    parts = {p for p in names if p} or {"core"}
    if "all" in parts:
        return set(LOAD_SECTIONS)
    unknown = sorted(parts - set(LOAD_SECTIONS))
    if unknown:
        raise ValueError(f"unknown include section(s) {unknown}; expected some of {list(LOAD_SECTIONS)} or all")
    return parts | {"core"}


def checkpoint_bytes(hf_dir: str) -> int:
    """Size of the model's weight files on disk (what /v1/loads reports as weight_gb)."""
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))


_ROUNDED = {"token_usage": 4, "gen_throughput": 2, "cache_hit_rate": 4, "utilization": 4}  # decimals in JSON


def core_load(engine: EngineCollector, rank: int) -> dict[str, int | float]:
    """One dp rank's core SchedulerLoadSnapshot fields, SMG's names, unrounded: /v1/loads and gRPC GetLoads."""
    values, load = engine.rank_values(rank), engine.rank_load(rank)
    return {
        "dp_rank": rank,
        "num_running_reqs": int(values["num_running_reqs"]),
        "num_waiting_reqs": load.num_waiting_reqs,
        "num_total_reqs": load.num_reqs,
        "num_used_tokens": load.num_tokens,
        "max_total_num_tokens": load.max_total_tokens,
        "token_usage": values["token_usage"],
        "gen_throughput": values["gen_throughput"],
        "cache_hit_rate": values["cache_hit_rate"],
        "utilization": values["utilization"],
        "max_running_requests": (load.stats or EngineStats()).max_running_requests,
    }


def disagg_mode_name(disaggregation_mode: str) -> str:
    """A worker's disaggregation mode as SGLang reports it in its loads: prefill, decode or null."""
    return disaggregation_mode if disaggregation_mode in ("prefill", "decode") else "null"


def worker_loads(engine: EngineCollector, include: set[str], disaggregation_mode: str,
                 weight_bytes: int) -> dict[str, object]:
    loads = []
    for rank in range(engine.num_ranks):
        values, load = engine.rank_values(rank), engine.rank_load(rank)
        stats = load.stats or EngineStats()
        entry: dict[str, object] = {key: round(v, _ROUNDED[key]) if key in _ROUNDED else v
                                    for key, v in core_load(engine, rank).items()}
        if "memory" in include:
            entry["memory"] = {"weight_gb": round(weight_bytes / 1e9, 4),
                               "kv_cache_gb": round(stats.kv_cache_bytes / 1e9, 4), "graph_gb": 0.0,
                               "token_capacity": load.max_total_tokens}
        if "queues" in include:
            entry["queues"] = {"waiting": load.num_waiting_reqs, "grammar": 0, "paused": 0,
                               "retracted": int(values["num_retracted_reqs"])}
        if "disagg" in include:
            pd = stats.pd or PDStats()
            entry.update({
                "disagg_mode": disagg_mode_name(disaggregation_mode),
                "prefill_queue_reqs": pd.num_prefill_prealloc_queue_reqs + pd.num_prefill_inflight_queue_reqs,
                "decode_queue_reqs": pd.num_decode_prealloc_queue_reqs + pd.num_decode_transfer_queue_reqs,
                "kv_transfer_latency_ms": round(pd.last_transfer.latency_ms, 3),
                "kv_transfer_speed_gb_s": round(pd.last_transfer.speed_gb_s, 4),
            })
        loads.append(entry)
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": __version__,
        "dp_rank_count": len(loads),
        "loads": loads,
        "aggregate": aggregate_loads(loads),
    }


def aggregate_loads(loads: Sequence[Mapping[str, Any]]) -> dict[str, int | float]:
    """SMG's EngineAggregateMetricsSnapshot of per-rank entries: counts sum, ratios average (rounded as it does)."""
    running = sum(int(x["num_running_reqs"]) for x in loads)
    waiting = sum(int(x["num_waiting_reqs"]) for x in loads)
    num = max(len(loads), 1)
    return {
        "total_running_reqs": running, "total_waiting_reqs": waiting, "total_reqs": running + waiting,
        "avg_token_usage": round(sum(float(x["token_usage"]) for x in loads) / num, 4),
        "avg_throughput": round(sum(float(x["gen_throughput"]) for x in loads) / num, 2),
        "avg_utilization": round(sum(float(x["utilization"]) for x in loads) / num, 4),
    }
