"""`pdserve bench --profile`: ask the workers to record torch profiler traces of the measured run, as SGLang's
bench_serving does (`/start_profile` before, `/stop_profile` after; with `--pd-separated`, each prefill and decode
worker directly, never the router)."""

from __future__ import annotations

import asyncio

import aiohttp

from pdserve.bench.client import BenchError, auth_headers
from pdserve.bench.config import BenchConfig

PROFILE_CALL_TIMEOUT_S = 120.0  # a stop writes the trace first


def profile_targets(cfg: BenchConfig) -> list[tuple[str, str | None]]:
    """(worker URL, trace file prefix): with --pd-separated the prefix names the role, so that traces written to
    one directory tell prefill from decode."""
    if cfg.pd_separated:
        return [(u.rstrip("/"), role) for role, urls in (("prefill", cfg.profile_prefill_urls),
                                                         ("decode", cfg.profile_decode_urls)) for u in urls]
    return [(cfg.base_url.rstrip("/"), None)]


def profile_body(cfg: BenchConfig, prefix: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"activities": list(cfg.profile_activities), "profile_by_stage": cfg.profile_by_stage}
    if prefix is not None:
        body["profile_prefix"] = prefix
    if cfg.profile_num_steps is not None:
        body["num_steps"] = cfg.profile_num_steps
    if cfg.profile_output_dir is not None:
        body["output_dir"] = cfg.profile_output_dir
    return body


async def _call(session: aiohttp.ClientSession, cfg: BenchConfig, url: str, body: dict | None) -> str:
    try:
        async with session.post(url, json=body, headers=auth_headers(cfg),
                                timeout=aiohttp.ClientTimeout(total=PROFILE_CALL_TIMEOUT_S)) as r:
            text = (await r.read()).decode(errors="replace")
            if r.status != 200:
                raise BenchError(f"POST {url} answered {r.status}: {text[:500]}")
            return text.strip()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise BenchError(f"POST {url} failed: {type(e).__name__}: {e}") from None


async def start_profile(session: aiohttp.ClientSession, cfg: BenchConfig) -> list[str]:
    """Start every target; if one refuses, stop the ones that started and raise."""
    targets = profile_targets(cfg)
    answers = await asyncio.gather(*(_call(session, cfg, u + "/start_profile", profile_body(cfg, prefix))
                                     for u, prefix in targets), return_exceptions=True)
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        started = [u for (u, _), a in zip(targets, answers) if not isinstance(a, BaseException)]
        await asyncio.gather(*(_call(session, cfg, u + "/stop_profile", None) for u in started),
                             return_exceptions=True)
        raise failed[0]
    return [str(a) for a in answers]


async def stop_profile(session: aiohttp.ClientSession, cfg: BenchConfig) -> list[str]:
    """Each worker's answer (it names the trace files). A worker that already stopped by itself (num_steps)
    answers 400 'not in progress': that is not an error here."""
    answers = []
    for url, _ in profile_targets(cfg):
        try:
            answers.append(await _call(session, cfg, url + "/stop_profile", None))
        except BenchError as e:
            if "not in progress" not in str(e):
                raise
            answers.append(f"{url}: stopped by itself after {cfg.profile_num_steps} steps")
    return answers
