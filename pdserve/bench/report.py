"""The result table (SGLang bench_serving's lines, names and order), side-by-side tables, and JSON files."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import orjson

from pdserve.bench.runner import BenchResult

_W = 50  # SGLang's table width
_TITLE = " Serving Benchmark Result "

# (label, summary key, format): "d" integers, "f" two decimals. None label: a section rule with its title.
_METRICS: tuple[tuple[str | None, str, str], ...] = (
    ("Successful requests:", "completed", "d"),
    ("Failed requests:", "failed", "d"),
    ("Benchmark duration (s):", "duration", "f"),
    ("Total input tokens:", "total_input_tokens", "d"),
    ("Total generated tokens:", "total_output_tokens", "d"),
    ("Prefix cache hit rate:", "cache_hit_rate", "f"),
    ("Request throughput (req/s):", "request_throughput", "f"),
    ("Goodput (req/s):", "goodput", "f"),
    ("Input token throughput (tok/s):", "input_throughput", "f"),
    ("Output token throughput (tok/s):", "output_throughput", "f"),
    ("Total token throughput (tok/s):", "total_throughput", "f"),
    ("Concurrency:", "concurrency", "f"),
    (None, "End-to-End Latency", ""),
    ("Mean E2E Latency (ms):", "mean_e2e_latency_ms", "f"),
    ("Median E2E Latency (ms):", "median_e2e_latency_ms", "f"),
    ("P99 E2E Latency (ms):", "p99_e2e_latency_ms", "f"),
    (None, "Time to First Token", ""),
    ("Mean TTFT (ms):", "mean_ttft_ms", "f"),
    ("Median TTFT (ms):", "median_ttft_ms", "f"),
    ("P99 TTFT (ms):", "p99_ttft_ms", "f"),
    (None, "Time per Output Token (excl. 1st token)", ""),
    ("Mean TPOT (ms):", "mean_tpot_ms", "f"),
    ("Median TPOT (ms):", "median_tpot_ms", "f"),
    ("P99 TPOT (ms):", "p99_tpot_ms", "f"),
    (None, "Inter-Token Latency", ""),
    ("Mean ITL (ms):", "mean_itl_ms", "f"),
    ("Median ITL (ms):", "median_itl_ms", "f"),
    ("P95 ITL (ms):", "p95_itl_ms", "f"),
    ("P99 ITL (ms):", "p99_itl_ms", "f"),
    ("Max ITL (ms):", "max_itl_ms", "f"),
)

# Per-kind lines (interference: how the decode streams' ITL and the long prompts' TTFT came out).
_KIND_METRICS: tuple[tuple[str, str, str], ...] = (
    ("Successful requests:", "completed", "d"),
    ("Mean TTFT (ms):", "mean_ttft_ms", "f"),
    ("P99 TTFT (ms):", "p99_ttft_ms", "f"),
    ("Mean ITL (ms):", "mean_itl_ms", "f"),
    ("P99 ITL (ms):", "p99_itl_ms", "f"),
    ("Max ITL (ms):", "max_itl_ms", "f"),
    ("Mean E2E Latency (ms):", "mean_e2e_latency_ms", "f"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "d":
        return str(int(value))
    if kind == "f":
        return f"{value:.2f}"
    return str(value)


def _context_rows(r: BenchResult) -> list[tuple[str, str]]:
    c = r.config
    slo = [f"{name}<={v:g}ms" for name, v in (("TTFT", c.slo_ttft_ms), ("TPOT", c.slo_tpot_ms),
                                               ("ITL-p99", c.slo_itl_ms), ("ITL-max", c.slo_itl_max_ms))
           if v is not None]
    return [
        ("Backend:", r.backend),
        ("Model:", r.model),
        ("Dataset:", c.dataset),
        ("Traffic request rate:", "inf" if math.isinf(c.request_rate) else f"{c.request_rate:g}"),
        ("Max request concurrency:", str(c.max_concurrency) if c.max_concurrency else "not set"),
        ("Goodput SLO:", " ".join(s for s in slo if s) or "none"),
    ]


def _short(value: str, limit: int = 32) -> str:
    """Side-by-side cells: a model path by its file name, and nothing longer than `limit`."""
    if "/" in value:
        value = os.path.basename(value.rstrip("/")) or value
    return value if len(value) <= limit else value[:limit - 3] + "..."


def format_result(result: BenchResult) -> str:
    """One result in SGLang bench_serving's layout ("{:<40} {:<10}" lines, 50-wide rules)."""
    lines = ["{s:{c}^{n}}".format(s=_TITLE, n=_W, c="=")]
    lines += ["{:<40} {:<10}".format(label, value) for label, value in _context_rows(result)]
    for label, key, kind in _METRICS:
        if label is None:
            lines.append("{s:{c}^{n}}".format(s=key, n=_W, c="-"))
        else:
            lines.append("{:<40} {:<10}".format(label, _fmt(result.summary[key], kind)))
    for kind_name, summary in result.by_kind.items():
        lines.append("{s:{c}^{n}}".format(s=f"Requests of kind '{kind_name}'", n=_W, c="-"))
        lines += ["{:<40} {:<10}".format(label, _fmt(summary[key], k)) for label, key, k in _KIND_METRICS]
    if result.summary["slo_attainment"]:
        lines.append("{s:{c}^{n}}".format(s="SLO attainment (SLOs x scale)", n=_W, c="-"))
        lines += ["{:<40} {:<10}".format(f"x{a['scale']:g}: attainment / goodput (req/s):",
                                         f"{a['attainment']:.2f} / {a['goodput']:.2f}")
                  for a in result.summary["slo_attainment"]]
    lines.append("=" * _W)
    return "\n".join(lines)


def format_table(results: Mapping[str, BenchResult]) -> str:
    """Several results side by side: one column per result (headed by its key), the same lines as
    format_result, so that two deployments compare at a glance."""
    names = list(results)
    rs = [results[n] for n in names]
    ctx = [[(label, _short(value)) for label, value in _context_rows(r)] for r in rs]
    widths = [max(14, len(n) + 2, *(len(v) + 2 for _, v in c)) for n, c in zip(names, ctx)]
    total = 40 + sum(widths)

    def row(label: str, values: list[str]) -> str:
        return f"{label:<40}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths))

    lines = ["{s:{c}^{n}}".format(s=_TITLE, n=total, c="="), row("", names)]
    for i, (label, _) in enumerate(ctx[0]):
        lines.append(row(label, [c[i][1] for c in ctx]))
    for label, key, kind in _METRICS:
        if label is None:
            lines.append("{s:{c}^{n}}".format(s=key, n=total, c="-"))
        else:
            lines.append(row(label, [_fmt(r.summary[key], kind) for r in rs]))
    kinds = sorted({k for r in rs for k in r.by_kind})
    for kind_name in kinds:
        lines.append("{s:{c}^{n}}".format(s=f"Requests of kind '{kind_name}'", n=total, c="-"))
        for label, key, k in _KIND_METRICS:
            lines.append(row(label, [_fmt(r.by_kind[kind_name][key], k) if kind_name in r.by_kind else "n/a"
                                     for r in rs]))
    lines.append("=" * total)
    return "\n".join(lines)


def write_json(path: str, result: BenchResult | Mapping[str, BenchResult]) -> None:
    """One result: its to_dict(); several: {name: to_dict()}."""
    data = result.to_dict() if isinstance(result, BenchResult) else {k: v.to_dict() for k, v in result.items()}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        f.write(b"\n")
