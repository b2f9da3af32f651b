"""Command-line flags of the router (SGLang router names) -> RouterConfig. The only place that knows them;
pdserve/cli.py (`pdserve route`) and pdserve/launch_router.py both use it."""

from __future__ import annotations

import argparse

from pdserve.router.config import (
    DEFAULT_BOOTSTRAP_PORT, DISPATCH_STYLES, LOG_LEVELS, POLICIES, BreakerConfig, CacheAwareConfig, HealthConfig,
    RetryConfig, RouterConfig, WorkerSpec,
)

_R, _C, _RT, _H, _B = RouterConfig(), CacheAwareConfig(), RetryConfig(), HealthConfig(), BreakerConfig()


def add_router_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("http")
    g.add_argument("--host", default=_R.host)
    g.add_argument("--port", type=int, default=_R.port)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health; also sent to workers")
    g.add_argument("--log-level", default=_R.log_level, choices=LOG_LEVELS)
    g.add_argument("--request-timeout-secs", type=float, default=_R.request_timeout_s)
    g.add_argument("--connect-timeout-secs", type=float, default=_R.connect_timeout_s)
    g.add_argument("--max-payload-size", type=int, default=_R.max_payload_size, help="bytes")

    g = parser.add_argument_group("workers")
    g.add_argument("--worker-urls", nargs="*", default=[], metavar="URL", help="unified servers (non-PD mode)")
    g.add_argument("--encode", nargs="*", default=[], metavar="URL",
                   help="EPD encode servers: image requests are encoded there before the language servers")
    g.add_argument("--pd-disaggregation", action="store_true", help="route to prefill/decode pairs")
    g.add_argument("--prefill", action="append", nargs="+", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                   help=f"prefill server and its bootstrap port (default {DEFAULT_BOOTSTRAP_PORT}, or 'none'); "
                        "repeat for more")
    g.add_argument("--decode", action="append", default=[], metavar="URL", help="decode server; repeat for more")
    g.add_argument("--discovery", default=None, metavar="etcd://HOST:PORT[/PREFIX]",
                   help="take workers from etcd, where servers started with the same --discovery register; they "
                        "join and leave at run time (beside any listed here)")
    g.add_argument("--dispatch", default=_R.dispatch, choices=DISPATCH_STYLES,
                   help="PD: parallel (SGLang's: prefill and decode at once, meeting at a bootstrap room), "
                        "prefill-first (vLLM's: the prefill answers kv_transfer_params, which the decode request "
                        "carries to claim the KV; OpenAI routes, one sequence; else parallel), decode-first "
                        "(Dynamo's order: the decode is picked and sent first, then the prefill)")
    g.add_argument("--disable-decode-fallback", action="store_true",
                   help="PD: fail requests while no prefill is healthy instead of letting a decode prefill them")

    g = parser.add_argument_group("policies")
    g.add_argument("--policy", default=_R.policy, choices=POLICIES, help="for both roles unless overridden")
    g.add_argument("--prefill-policy", default=None, choices=POLICIES,
                   help="kv_aware: by what each prefill's cache holds, from its KV events (servers started with "
                        "--kv-events-config; the router tokenizes prompts with --tokenizer-path)")
    g.add_argument("--tokenizer-path", default=None,
                   help="kv_aware: the served model (a Hugging Face directory or GGUF; default: pdserve's default "
                        "model), whose tokenizer and chat template give the token ids the workers cache")
    g.add_argument("--decode-policy", default=None, choices=POLICIES)
    g.add_argument("--cache-threshold", type=float, default=_C.cache_threshold)
    g.add_argument("--balance-abs-threshold", type=int, default=_C.balance_abs_threshold)
    g.add_argument("--balance-rel-threshold", type=float, default=_C.balance_rel_threshold)
    g.add_argument("--eviction-interval", "--eviction-interval-secs", dest="eviction_interval", type=float,
                   default=_C.eviction_interval_s)
    g.add_argument("--max-tree-size", type=int, default=_C.max_tree_size, help="characters per worker")
    g.add_argument("--load-monitor-interval", type=float, default=_R.load_poll_interval_s,
                   help="seconds between /get_load polls (power_of_two)")

    g = parser.add_argument_group("retries")
    g.add_argument("--retry-max-retries", type=int, default=_RT.max_retries)
    g.add_argument("--retry-initial-backoff-ms", type=float, default=_RT.initial_backoff_ms)
    g.add_argument("--retry-max-backoff-ms", type=float, default=_RT.max_backoff_ms)
    g.add_argument("--retry-backoff-multiplier", type=float, default=_RT.backoff_multiplier)
    g.add_argument("--retry-jitter-factor", type=float, default=_RT.jitter_factor)
    g.add_argument("--retry-budget-ratio", type=float, default=_RT.budget_ratio,
                   help="retries allowed as a fraction of requests (plus --retry-budget-min-per-sec)")
    g.add_argument("--retry-budget-min-per-sec", type=float, default=_RT.budget_min_per_s)
    g.add_argument("--disable-retries", action="store_true")

    g.add_argument("--migration-limit", type=int, default=_R.migration_limit,
                   help="times a stream may continue on another worker (pair) after its own failed mid-stream "
                        "(the tokens already sent are kept; 0: off)")
    g.add_argument("--stream-stall-timeout-secs", type=float, default=_R.stream_stall_timeout_s,
                   help="a stream that sends nothing for this long after its first byte (or, in PD, before its "
                        "first byte once its prefill ended) counts as failed and migrates; 0: never")

    g = parser.add_argument_group("circuit breaker")
    g.add_argument("--cb-failure-threshold", type=int, default=_B.failure_threshold)
    g.add_argument("--cb-success-threshold", type=int, default=_B.success_threshold)
    g.add_argument("--cb-timeout-duration-secs", type=float, default=_B.timeout_s)
    g.add_argument("--disable-circuit-breaker", action="store_true")

    g = parser.add_argument_group("health checks")
    g.add_argument("--health-check-interval-secs", type=float, default=_H.interval_s)
    g.add_argument("--health-check-timeout-secs", type=float, default=_H.timeout_s)
    g.add_argument("--health-failure-threshold", type=int, default=_H.failure_threshold)
    g.add_argument("--health-success-threshold", type=int, default=_H.success_threshold)
    g.add_argument("--health-check-endpoint", default=_H.endpoint)
    g.add_argument("--disable-health-check", action="store_true", help="every worker counts as healthy")


def _prefill_spec(entry: list[str]) -> WorkerSpec:
    if len(entry) > 2:
        raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(entry)}")
    port: int | None = DEFAULT_BOOTSTRAP_PORT
    if len(entry) == 2:
        if entry[1].lower() == "none":
            port = None
        else:
            try:
                port = int(entry[1])
            except ValueError:
                raise ValueError(f"--prefill bootstrap port must be a number or 'none', got {entry[1]!r}") from None
    return WorkerSpec(entry[0], "prefill", port)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Raises ValueError (from the config dataclasses) for invalid values."""
    if (args.prefill or args.decode) and not args.pd_disaggregation:
        raise ValueError("--prefill/--decode need --pd-disaggregation")
    if args.pd_disaggregation and args.worker_urls:
        raise ValueError("--worker-urls is for non-PD mode; use --prefill/--decode with --pd-disaggregation")
    workers = [_prefill_spec(p) for p in args.prefill] + [WorkerSpec(d, "decode") for d in args.decode]
    workers += [WorkerSpec(u, "regular") for u in args.worker_urls]
    return RouterConfig(
        host=args.host, port=args.port, pd_disaggregation=args.pd_disaggregation, workers=tuple(workers),
        encode_urls=tuple(u.rstrip("/") for u in args.encode), decode_fallback=not args.disable_decode_fallback,
        dispatch=args.dispatch, tokenizer_path=args.tokenizer_path,
        discovery=args.discovery, migration_limit=args.migration_limit,
        stream_stall_timeout_s=args.stream_stall_timeout_secs or None,
        policy=args.policy, prefill_policy=args.prefill_policy, decode_policy=args.decode_policy,
        cache_aware=CacheAwareConfig(
            cache_threshold=args.cache_threshold, balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold, eviction_interval_s=args.eviction_interval,
            max_tree_size=args.max_tree_size,
        ),
        retry=RetryConfig(
            max_retries=0 if args.disable_retries else args.retry_max_retries,
            initial_backoff_ms=args.retry_initial_backoff_ms, max_backoff_ms=args.retry_max_backoff_ms,
            backoff_multiplier=args.retry_backoff_multiplier, jitter_factor=args.retry_jitter_factor,
            budget_ratio=args.retry_budget_ratio, budget_min_per_s=args.retry_budget_min_per_sec,
        ),
        health=HealthConfig(
            enabled=not args.disable_health_check, interval_s=args.health_check_interval_secs,
            timeout_s=args.health_check_timeout_secs, failure_threshold=args.health_failure_threshold,
            success_threshold=args.health_success_threshold, endpoint=args.health_check_endpoint,
        ),
        breaker=BreakerConfig(
            enabled=not args.disable_circuit_breaker, failure_threshold=args.cb_failure_threshold,
            success_threshold=args.cb_success_threshold, timeout_s=args.cb_timeout_duration_secs,
        ),
        load_poll_interval_s=args.load_monitor_interval,
        request_timeout_s=args.request_timeout_secs,
        connect_timeout_s=args.connect_timeout_secs,
        max_payload_size=args.max_payload_size,
        api_key=args.api_key,
        log_level=args.log_level,
    )


def parse_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RouterConfig:
    """config_from_args, reporting invalid values as argparse errors (exit code 2)."""
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def parse_router_args(argv: list[str] | None = None, prog: str | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Run the pdserve router.")
    add_router_args(parser)
    return parse_config(parser, parser.parse_args(argv))
