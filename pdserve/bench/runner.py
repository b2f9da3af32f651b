"""Run a benchmark: warmup, the measured load (rate/concurrency-shaped or the interference schedule), summary.

Library use (two deployments compared side by side in one script):

    import asyncio
    from pdserve.bench import BenchConfig, format_table, run_benchmarks

    common = dict(dataset="random", num_prompts=50, random_input_len=512, random_output_len=64, max_concurrency=8)
    results = asyncio.run(run_benchmarks({
        "unified": BenchConfig(base_url="http://127.0.0.1:30000", **common),
        "pd": BenchConfig(base_url="http://127.0.0.1:8000", **common),
    }))
    print(format_table(results))
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from tqdm import tqdm

from pdserve.bench import datasets
from pdserve.bench.client import BenchError, RequestRecord, fetch_model, new_session, send_request
from pdserve.bench.config import BenchConfig
from pdserve.bench.datasets import RequestSpec
from pdserve.bench.metrics import summarize, summarize_by_kind
from pdserve.bench.profile import start_profile, stop_profile


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    summary: dict[str, Any]  # metrics.SUMMARY_KEYS
    by_kind: dict[str, dict[str, Any]]  # per request kind when a run mixes kinds (interference)
    records: list[RequestRecord]  # every request sent, by index
    started_at: float  # unix time of the measured run's start
    not_sent: int  # requests planned but never sent (--duration-limit)

    @property
    def label(self) -> str:
        return self.config.label or self.config.base_url

    @property
    def backend(self) -> str:
        return "openai-chat" if self.config.is_chat else "openai"

    def to_dict(self) -> dict[str, Any]:
        """Flat summary columns first (as SGLang's result JSON), then context and the per-request records."""
        c = self.config
        return {
            **self.summary, "not_sent": self.not_sent,
            "label": self.label, "backend": self.backend, "base_url": c.base_url, "endpoint": c.endpoint,
            "model": self.model, "dataset": c.dataset,
            "request_rate": "inf" if math.isinf(c.request_rate) else c.request_rate,
            "max_concurrency": c.max_concurrency, "started_at": self.started_at,
            "by_kind": self.by_kind, "config": c.to_dict(),
            "records": [r.to_dict() for r in self.records],
        }


def _log(cfg: BenchConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


class _Run:
    """State of one measured run: the session, the clock, the records and the progress bar."""

    def __init__(self, session: aiohttp.ClientSession, cfg: BenchConfig, model: str, total: int):
        self.session, self.cfg, self.model = session, cfg, model
        self.records: list[RequestRecord] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cfg.duration_limit
        self.pbar = tqdm(total=total, file=sys.stderr, disable=not cfg.progress, desc=cfg.label or "bench",
                         unit="req", dynamic_ncols=True)

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    async def send(self, spec: RequestSpec) -> RequestRecord | None:
        """Send one request unless the run is over; the record joins the run's records when it starts."""
        if self.expired():
            return None
        rec = RequestRecord.for_spec(spec)
        self.records.append(rec)
        try:
            await send_request(self.session, self.cfg, self.model, spec, rec, self.t0)
        finally:
            self.pbar.update(1)
        return rec

    async def sleep_until(self, t: float) -> bool:
        """Sleep until perf_counter() == t; False (at once) if t is past the deadline."""
        if t >= self.deadline:
            return False
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return True

    async def finish(self, tasks: Sequence[asyncio.Task]) -> None:
        """Wait for `tasks` until the deadline; cancel what is left (its records say so)."""
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, self.deadline - time.perf_counter()))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.pbar.close()


async def _run_requests(run: _Run, specs: Sequence[RequestSpec], rng: random.Random) -> None:
    """random / shared-prefix: Poisson arrivals at --request-rate (or all at once), at most --max-concurrency
    in flight. A request's clock starts when it is sent, after waiting for a concurrency slot."""
    cfg = run.cfg
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def issue(spec: RequestSpec) -> None:
        if sem is None:
            await run.send(spec)
        else:
            async with sem:
                await run.send(spec)

    tasks = []
    arrival = run.t0
    for i, spec in enumerate(specs):
        if i > 0 and not math.isinf(cfg.request_rate):
            arrival += rng.expovariate(cfg.request_rate)
            if not await run.sleep_until(arrival):
                break
        tasks.append(asyncio.create_task(issue(spec)))
    await run.finish(tasks)


async def _run_interference(run: _Run, decode_specs: Sequence[RequestSpec], long_specs: Sequence[RequestSpec],
                            rng: random.Random, next_index: Callable[[], int]) -> None:
    """The decode streams start at once and each is restarted (a fresh request) when it ends while long
    prompts are still pending or --min-decode-duration has not passed; the long prompts arrive evenly at
    --long-prompt-rate after --long-prompt-delay; short requests (--short-request-rate) arrive while they run."""
    cfg = run.cfg
    long_done = asyncio.Event()
    min_end = run.t0 + cfg.min_decode_duration

    def streams_wanted() -> bool:
        return not long_done.is_set() or time.perf_counter() < min_end

    async def decode_stream(spec: RequestSpec) -> None:
        for n in range(cfg.max_decode_restarts + 1):
            if n > 0:
                if not streams_wanted() or run.expired():
                    return
                spec = datasets.decode_request(cfg, rng, next_index())
                run.pbar.total += 1
                run.pbar.refresh()
            rec = await run.send(spec)
            if rec is None or not rec.success:
                return  # a failing server is not hammered in a loop
        if streams_wanted():
            _log(cfg, f"a decode stream stopped early: {cfg.max_decode_restarts} restarts is the most per stream")

    async def long_arrivals() -> None:
        sent: list[Awaitable] = []
        for i, spec in enumerate(long_specs):
            if not await run.sleep_until(run.t0 + cfg.long_prompt_delay + i / cfg.long_prompt_rate):
                break
            sent.append(asyncio.create_task(run.send(spec)))
        try:
            await asyncio.gather(*sent)
        finally:
            long_done.set()

    async def short_arrivals() -> None:
        """Poisson arrivals from the first long prompt until the last long prompt is answered (bounded: at most
        the rate times the run's time limit)."""
        sent: list[Awaitable] = []
        t = run.t0 + cfg.long_prompt_delay
        for _ in range(int(cfg.short_request_rate * cfg.duration_limit) + 1):
            t += rng.expovariate(cfg.short_request_rate)
            if not await run.sleep_until(t) or long_done.is_set():
                break
            run.pbar.total += 1
            run.pbar.refresh()
            sent.append(asyncio.create_task(run.send(datasets.short_request(cfg, rng, next_index()))))
        await asyncio.gather(*sent)

    tasks = [asyncio.create_task(decode_stream(s)) for s in decode_specs]
    tasks.append(asyncio.create_task(long_arrivals()))
    if cfg.short_request_rate > 0 and long_specs:
        tasks.append(asyncio.create_task(short_arrivals()))
    await run.finish(tasks)


async def _warmup(session: aiohttp.ClientSession, cfg: BenchConfig, model: str, rng: random.Random) -> None:
    if cfg.warmup_requests == 0:
        return
    _log(cfg, f"warmup: {cfg.warmup_requests} request(s) to {cfg.url} (model {model!r})")
    specs = [datasets.warmup_request(cfg, rng, -1 - i) for i in range(cfg.warmup_requests)]
    recs = [RequestRecord.for_spec(s) for s in specs]
    sem = asyncio.Semaphore(cfg.max_concurrency or len(specs))
    t0 = time.perf_counter()

    async def one(spec: RequestSpec, rec: RequestRecord) -> None:
        async with sem:
            await send_request(session, cfg, model, spec, rec, t0)

    await asyncio.gather(*(one(s, r) for s, r in zip(specs, recs)))
    if not any(r.success for r in recs):
        raise BenchError(f"warmup failed ({cfg.url}): {recs[0].error}")


async def _measure(session: aiohttp.ClientSession, cfg: BenchConfig, model: str,
                   rng: random.Random) -> tuple[_Run, int]:
    """The measured run: (its state, how many planned requests were not sent)."""
    if cfg.dataset == "interference":
        decode_specs = [datasets.decode_request(cfg, rng, i) for i in range(cfg.num_decode_streams)]
        long_specs = datasets.long_requests(cfg, rng, cfg.num_decode_streams)
        planned = len(decode_specs) + len(long_specs)
        counter = itertools.count(planned)
        _log(cfg, f"interference: {len(decode_specs)} decode streams ({cfg.decode_output_len} tokens each, "
                  f"restarted while long prompts run), {len(long_specs)} long prompts of {cfg.long_prompt_len} "
                  f"tokens at {cfg.long_prompt_rate:g}/s after {cfg.long_prompt_delay:g} s")
        run = _Run(session, cfg, model, planned)
        await _run_interference(run, decode_specs, long_specs, rng, lambda: next(counter))
        sent = {r.index for r in run.records}
        not_sent = sum(1 for s in (*decode_specs, *long_specs) if s.index not in sent)
    else:
        specs = datasets.build_requests(cfg, rng)
        rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}/s"
        _log(cfg, f"{cfg.dataset}: {len(specs)} requests, request rate {rate}, "
                  f"max concurrency {cfg.max_concurrency or 'not set'}")
        run = _Run(session, cfg, model, len(specs))
        await _run_requests(run, specs, rng)
        not_sent = len(specs) - len(run.records)
    return run, not_sent


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """One run against one endpoint. Raises BenchError when it cannot start (no server, no model, warmup
    failed); failed measured requests are recorded, not raised."""
    cfg = config.validate()
    rng = random.Random(cfg.seed)
    async with new_session() as session:
        model = cfg.model or await fetch_model(session, cfg)
        await _warmup(session, cfg, model, rng)
        if cfg.profile:
            for answer in await start_profile(session, cfg):
                _log(cfg, f"profile: {answer.strip()}")
        started_at = time.time()
        try:
            run, not_sent = await _measure(session, cfg, model, rng)
            duration = time.perf_counter() - run.t0
        finally:  # never leave the workers recording (the profiler keeps every event in memory)
            if cfg.profile:
                for answer in await stop_profile(session, cfg):
                    _log(cfg, f"profile: {answer}")
    if not_sent:
        _log(cfg, f"--duration-limit {cfg.duration_limit:g} s reached: {not_sent} request(s) not sent")
    records = sorted(run.records, key=lambda r: r.index)
    return BenchResult(
        config=cfg, model=model,
        summary=summarize(records, duration, cfg.slo, cfg.slo_scales),
        by_kind=summarize_by_kind(records, duration, cfg.slo, cfg.slo_scales),
        records=records, started_at=started_at, not_sent=not_sent,
    )


async def run_benchmarks(configs: Mapping[str, BenchConfig]) -> dict[str, BenchResult]:
    """Run several configs one after the other (never at once: they would load each other's machines),
    each labelled with its key; feed the result to report.format_table for a side-by-side table."""
    return {name: await run_benchmark(replace(cfg, label=cfg.label or name)) for name, cfg in configs.items()}
