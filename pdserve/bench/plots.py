"""PNG charts of one or several results (matplotlib, Agg backend: no display needed).

ttft.png          TTFT histogram and CDF
itl.png           ITL histogram (log counts) and CDF
itl_timeline.png  every inter-token gap at the wall time it ended (x: seconds since the run's start, y: gap
                  in ms), one panel per result; prefill stalls show as spikes. interference marks each long
                  prompt's arrival (dashed line) and its time to first token (shaded).
slo_attainment.png  (runs with --slo-scale) SLO attainment and goodput against the SLO scale, one line per
                  result (DistServe's curve)
goodput_vs_rate.png  (write_rate_plot) SLO attainment and goodput against the request rate, one line per
                  deployment
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pdserve.bench.metrics import attainment_at  # noqa: E402
from pdserve.bench.runner import BenchResult  # noqa: E402

FILES = ("ttft.png", "itl.png", "itl_timeline.png")
_KIND_STYLE = {  # (color, marker, size): a long prompt's gaps ("x") stay visible over the decodes' ("o")
    "decode": ("tab:blue", "o", 8), "long": ("tab:red", "x", 30),
    "short": ("tab:green", "o", 8),
    "random": ("tab:blue", "o", 8), "shared-prefix": ("tab:green", "o", 8),
}


def _ttfts_ms(r: BenchResult) -> list[float]:
    return [rec.ttft * 1000 for rec in r.records if rec.success and rec.ttft is not None]


def _itls_ms(r: BenchResult) -> list[float]:
    return [gap * 1000 for rec in r.records if rec.success for gap in rec.itl]


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    s = sorted(values)
    ax.step(s, [(i + 1) / len(s) for i in range(len(s))], where="post", label=label)


def _distribution(results: Mapping[str, BenchResult], values_of, title: str, xlabel: str, path: str,
                  log_counts: bool) -> None:
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        values = values_of(r)
        if values:
            hist.hist(values, bins=min(50, max(5, len(values) // 2)), alpha=0.6, label=f"{name} (n={len(values)})")
        _cdf(cdf, values, name)
    hist.set(title=f"{title}: histogram", xlabel=xlabel, ylabel="count")
    if log_counts:
        hist.set_yscale("log")
    cdf.set(title=f"{title}: CDF", xlabel=xlabel, ylabel="fraction <= x", ylim=(0, 1.02))
    for ax in (hist, cdf):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timeline(results: Mapping[str, BenchResult], path: str) -> None:
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(12, 4 * n), squeeze=False, sharex=True)
    t_end = 0.0  # the longest run sets the shared time axis
    for ax, (name, r) in zip(axes[:, 0], results.items()):
        t_end = max(t_end, r.summary["duration"])
        kinds: dict[str, tuple[list[float], list[float]]] = {}
        for rec in r.records:
            times = rec.token_times()
            xs, ys = kinds.setdefault(rec.kind, ([], []))
            xs.extend(times[1:])
            ys.extend(gap * 1000 for gap in rec.itl)
        for kind, (xs, ys) in sorted(kinds.items()):
            if xs:
                color, marker, size = _KIND_STYLE.get(kind, ("tab:gray", "o", 8))
                ax.scatter(xs, ys, s=size, alpha=0.8, color=color, marker=marker, label=f"ITL of {kind} requests")
        longs = [rec for rec in r.records if rec.kind == "long"]
        for i, rec in enumerate(longs):
            ax.axvline(rec.start_time, color="tab:red", linestyle="--", linewidth=1,
                       label="long prompt arrives" if i == 0 else None)
            if rec.ttft is not None:
                ax.axvspan(rec.start_time, rec.start_time + rec.ttft, color="tab:red", alpha=0.08,
                           label="long prompt's TTFT" if i == 0 else None)
        ax.set(title=f"{name}: inter-token gaps over time ({r.config.dataset})", ylabel="ITL (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper right")
    axes[-1, 0].set_xlim(0, 1.02 * t_end)
    axes[-1, 0].set_xlabel("time since the run's start (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(results: BenchResult | Mapping[str, BenchResult], out_dir: str) -> list[str]:
    """Write FILES into out_dir (created); returns their paths. Several results share each chart."""
    if isinstance(results, BenchResult):
        results = {results.label: results}
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in FILES]
    _distribution(results, _ttfts_ms, "TTFT", "TTFT (ms)", paths[0], log_counts=False)
    _distribution(results, _itls_ms, "ITL", "inter-token latency (ms)", paths[1], log_counts=True)
    _timeline(results, paths[2])
    if any(r.summary.get("slo_attainment") for r in results.values()):
        paths.append(os.path.join(out_dir, "slo_attainment.png"))
        _attainment(results, paths[-1])
    return paths


def _attainment(results: Mapping[str, BenchResult], path: str) -> None:
    fig, (ax_att, ax_good) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        points = r.summary.get("slo_attainment") or []
        scales = [p["scale"] for p in points]
        ax_att.plot(scales, [100 * p["attainment"] for p in points], marker="o", label=label)
        ax_good.plot(scales, [p["goodput"] for p in points], marker="o", label=label)
    for ax, ylabel in ((ax_att, "SLO attainment (%)"), (ax_good, "goodput (req/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SLO scale (every SLO times this)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_rate_plot(sweeps: Mapping[str, Mapping[float, BenchResult]], path: str, scale: float = 1.0) -> str:
    """SLO attainment and goodput (at SLO scale `scale`) against the request rate: sweeps maps a deployment's
    label to its results by rate (requests per second of the swept kind)."""
    fig, (ax_att, ax_good) = plt.subplots(1, 2, figsize=(11, 4))
    for label, by_rate in sweeps.items():
        rates = sorted(by_rate)
        points = []
        for rate in rates:
            point = attainment_at(by_rate[rate].summary, scale)
            if point is None:
                raise ValueError(f"{label}: no SLO attainment at scale {scale:g} (run with it in --slo-scale)")
            points.append(point)
        ax_att.plot(rates, [100 * p["attainment"] for p in points], marker="o", label=label)
        ax_good.plot(rates, [p["goodput"] for p in points], marker="o", label=label)
    for ax, ylabel in ((ax_att, f"SLO attainment (%), SLO x{scale:g}"), (ax_good, f"goodput (req/s), SLO x{scale:g}")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
