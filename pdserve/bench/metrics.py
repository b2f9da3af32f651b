"""Aggregate RequestRecords into the summary columns of SGLang's bench_serving (plus goodput).

Definitions (SGLang's): throughputs and concurrency count successful requests only; TPOT of a request is
(e2e - ttft) / (output_len - 1); ITL statistics pool every gap of every successful request; concurrency is
the sum of e2e latencies over the duration. Goodput counts successful requests whose TTFT and TPOT meet the
given SLOs (an SLO not given always holds; a request with one output token has no TPOT and meets it). The ITL
SLO is per request, as users feel it (DistServe-style goodput): the request's own p99 gap between tokens must be
within `itl_ms`, and its longest gap within `itl_max_ms` (when given); a request with under two gaps has no p99 gap.
`slo_scales` sweeps every SLO by a factor (DistServe's attainment-vs-SLO-scale curve) over the same records.
Empty statistics are None (JSON null, printed as n/a).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from pdserve.bench.client import RequestRecord
from pdserve.bench.config import Slo

# Every key of a summary, in the order of the printed table; the JSON carries all of them.
SUMMARY_KEYS = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "cache_hit_rate",
    "request_throughput", "goodput", "input_throughput", "output_throughput", "total_throughput", "concurrency",
    "mean_e2e_latency_ms", "median_e2e_latency_ms", "std_e2e_latency_ms", "p99_e2e_latency_ms",
    "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "std_itl_ms", "p95_itl_ms", "p99_itl_ms", "max_itl_ms",
    "good_requests", "slo_attainment", "slo_ttft_ms", "slo_tpot_ms", "slo_itl_ms", "slo_itl_max_ms",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def std(values: Sequence[float]) -> float | None:
    """Population standard deviation (numpy's default)."""
    m = mean(values)
    if m is None:
        return None
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def _stats(prefix: str, values_s: Sequence[float], pcts: Iterable[int], with_max: bool = False) -> dict[str, Any]:
    out = {f"mean_{prefix}_ms": _ms(mean(values_s)), f"median_{prefix}_ms": _ms(percentile(values_s, 50)),
           f"std_{prefix}_ms": _ms(std(values_s))}
    for p in pcts:
        out[f"p{p}_{prefix}_ms"] = _ms(percentile(values_s, p))
    if with_max:
        out[f"max_{prefix}_ms"] = _ms(max(values_s)) if values_s else None
    return out


def meets_slo(rec: RequestRecord, slo: Slo) -> bool:
    if not rec.success:
        return False
    if slo.ttft_ms is not None and (rec.ttft is None or rec.ttft * 1000.0 > slo.ttft_ms):
        return False
    tpot = rec.tpot
    if slo.tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo.tpot_ms:
        return False
    if slo.itl_ms is not None and len(rec.itl) >= 2 and percentile(rec.itl, 99) * 1000.0 > slo.itl_ms:
        return False
    if slo.itl_max_ms is not None and rec.itl and max(rec.itl) * 1000.0 > slo.itl_max_ms:
        return False
    return True


def slo_attainment(records: Sequence[RequestRecord], duration: float, slo: Slo,
                   scales: Sequence[float]) -> list[dict[str, float]]:
    """For each factor: the share of requests (sent ones, failures included) meeting the scaled SLOs, and the
    goodput (requests per second) that gives."""
    out = []
    for factor in scales:
        good = sum(1 for r in records if meets_slo(r, slo.scaled(factor)))
        out.append({"scale": factor, "good_requests": good,
                    "attainment": good / len(records) if records else 0.0, "goodput": good / max(duration, 1e-9)})
    return out


def attainment_at(summary: dict[str, Any], scale: float) -> dict[str, Any] | None:
    """The summary's SLO attainment point at `scale` (run with it in slo_scales), or None."""
    return next((p for p in summary.get("slo_attainment") or [] if p["scale"] == scale), None)


def summarize(records: Sequence[RequestRecord], duration: float, slo: Slo | None = None,
              slo_scales: Sequence[float] = ()) -> dict[str, Any]:
    slo = slo or Slo()
    ok = [r for r in records if r.success]
    dur = max(duration, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    good = sum(1 for r in ok if meets_slo(r, slo))
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        # prompt tokens served from the server's prefix cache, as its usage reports them
        "cache_hit_rate": sum(r.cached_len for r in ok) / total_in if total_in else 0.0,
        "request_throughput": len(ok) / dur, "goodput": good / dur,
        "input_throughput": total_in / dur, "output_throughput": total_out / dur,
        "total_throughput": (total_in + total_out) / dur, "concurrency": sum(e2es) / dur,
        **_stats("e2e_latency", e2es, (99,)),
        **_stats("ttft", ttfts, (99,)),
        **_stats("tpot", tpots, (99,)),
        **_stats("itl", itls, (95, 99), with_max=True),
        "good_requests": good, "slo_attainment": slo_attainment(records, duration, slo, slo_scales),
        "slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms, "slo_itl_ms": slo.itl_ms,
        "slo_itl_max_ms": slo.itl_max_ms,
    }
    return summary


def summarize_by_kind(records: Sequence[RequestRecord], duration: float, slo: Slo | None = None,
                      slo_scales: Sequence[float] = ()) -> dict[str, dict[str, Any]]:
    """One summary per request kind (interference: `decode` and `long`); empty when there is only one kind."""
    kinds = sorted({r.kind for r in records})
    if len(kinds) < 2:
        return {}
    return {k: summarize([r for r in records if r.kind == k], duration, slo, slo_scales) for k in kinds}
