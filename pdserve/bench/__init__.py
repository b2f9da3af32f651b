"""`pdserve bench`: a load generator for OpenAI-compatible endpoints (pdserve, SGLang, vLLM, ...).

    pdserve bench --base-url http://127.0.0.1:8000 --dataset random --num-prompts 200 \\
        --random-input-len 512 --random-output-len 64 --max-concurrency 16 --output-file r.json --plot plots/

From Python (run_benchmark/run_benchmarks are coroutines; runner.py shows two deployments side by side):
BenchConfig, run_benchmark, run_benchmarks, BenchResult, format_result, format_table, write_json, and
plots.write_plots (imports matplotlib). The names load lazily so that `pdserve.bench.args` (imported by the
`pdserve` CLI for every subcommand) pulls in nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": "pdserve.bench.config", "BenchError": "pdserve.bench.client",
    "RequestRecord": "pdserve.bench.client", "BenchResult": "pdserve.bench.runner",
    "run_benchmark": "pdserve.bench.runner", "run_benchmarks": "pdserve.bench.runner",
    "format_result": "pdserve.bench.report", "format_table": "pdserve.bench.report",
    "write_json": "pdserve.bench.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pdserve.bench' has no attribute {name!r}")
