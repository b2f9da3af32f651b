"""`pdserve bench`: run, print the table (stdout), write the JSON and the charts. Messages go to stderr."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pdserve.bench.args import config_from_args
from pdserve.bench.client import BenchError
from pdserve.bench.report import format_result, write_json
from pdserve.bench.runner import run_benchmark


def run_bench_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Exit status: 0 when at least one measured request succeeded, 1 otherwise or when the run could not
    start (server unreachable, warmup failed), 130 on Ctrl-C."""
    config = config_from_args(parser, args)
    try:
        result = asyncio.run(run_benchmark(config))
    except BenchError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve bench: interrupted", file=sys.stderr)
        return 130
    print(format_result(result), flush=True)
    failed = [r for r in result.records if not r.success]
    if failed:
        print(f"pdserve bench: {len(failed)} request(s) failed; first error: {failed[0].error}", file=sys.stderr)
    if args.output_file:
        write_json(args.output_file, result)
        print(f"pdserve bench: wrote {args.output_file}", file=sys.stderr)
    if args.plot:
        from pdserve.bench.plots import write_plots  # matplotlib only when asked

        for path in write_plots(result, args.plot):
            print(f"pdserve bench: wrote {path}", file=sys.stderr)
    return 0 if result.summary["completed"] > 0 else 1
