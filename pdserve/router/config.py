"""Frozen, validated router configuration (argparse lives in router/args.py only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ROLES = ("prefill", "decode", "regular")
POLICIES = ("random", "round_robin", "power_of_two", "cache_aware", "kv_aware")
# PD dispatch styles: parallel (SGLang's: both legs at once, meeting at the bootstrap room), prefill-first (vLLM's:
# the prefill answers kv_transfer_params, the decode request carries them and claims the KV), decode-first
# (Dynamo's order: the decode is picked and sent first, then the prefill).
DISPATCH_STYLES = ("parallel", "prefill-first", "decode-first")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_BOOTSTRAP_PORT = 8998


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def normalize_url(url: str) -> str:
    """'http://host:port' without a trailing slash; ValueError unless http(s) with a host."""
    _check(isinstance(url, str) and bool(url), f"worker url must be a non-empty string, got {url!r}")
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    _check(parts.scheme in ("http", "https"), f"worker url must be http:// or https://, got {url!r}")
    _check(bool(parts.hostname), f"worker url has no host: {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"worker url has an invalid port: {url!r}") from e
    return url


def bootstrap_host_of(url: str) -> str:
    """The prefill URL's host as the decode needs it: IPv6 literals in brackets."""
    host = urlsplit(url).hostname or ""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class WorkerSpec:
    url: str
    role: str = "regular"
    bootstrap_port: int | None = None  # prefill only; None: the decode uses its own default

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        _check(self.role in ROLES, f"worker role must be one of {ROLES}, got {self.role!r}")
        if self.bootstrap_port is not None:
            _check(self.role == "prefill", f"only prefill workers have a bootstrap port ({self.url})")
            _check(isinstance(self.bootstrap_port, int) and not isinstance(self.bootstrap_port, bool)
                   and 0 < self.bootstrap_port < 65536,
                   f"bootstrap port must be in 1..65535, got {self.bootstrap_port!r}")


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3  # match rate above which the matching worker wins
    balance_abs_threshold: int = 64  # load imbalance (requests) that switches to least-loaded ...
    balance_rel_threshold: float = 1.5  # ... when also max > min * this
    eviction_interval_s: float = 60.0
    max_tree_size: int = 2 ** 26  # characters per worker

    def __post_init__(self) -> None:
        _check(0.0 <= self.cache_threshold <= 1.0, f"cache threshold must be in [0, 1], got {self.cache_threshold}")
        _check(self.balance_abs_threshold >= 0, f"balance abs threshold must be >= 0, got {self.balance_abs_threshold}")
        _check(math.isfinite(self.balance_rel_threshold) and self.balance_rel_threshold >= 1.0,
               f"balance rel threshold must be finite and >= 1, got {self.balance_rel_threshold}")
        _check(self.eviction_interval_s > 0, f"eviction interval must be > 0, got {self.eviction_interval_s}")
        _check(self.max_tree_size >= 1, f"max tree size must be >= 1, got {self.max_tree_size}")


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = 5  # extra attempts after the first
    initial_backoff_ms: float = 50.0
    max_backoff_ms: float = 30000.0
    backoff_multiplier: float = 1.5
    jitter_factor: float = 0.2
    budget_ratio: float = 0.2  # retries may add this fraction of the request rate ...
    budget_min_per_s: float = 10.0  # ... plus this many per second

    def __post_init__(self) -> None:
        _check(self.max_retries >= 0, f"max retries must be >= 0, got {self.max_retries}")
        _check(0 <= self.initial_backoff_ms <= self.max_backoff_ms,
               f"need 0 <= initial backoff ({self.initial_backoff_ms}) <= max backoff ({self.max_backoff_ms})")
        _check(math.isfinite(self.backoff_multiplier) and self.backoff_multiplier >= 1.0,
               f"backoff multiplier must be finite and >= 1, got {self.backoff_multiplier}")
        _check(0.0 <= self.jitter_factor <= 1.0, f"jitter factor must be in [0, 1], got {self.jitter_factor}")
        _check(self.budget_ratio >= 0 and self.budget_min_per_s >= 0, "retry budget values must be >= 0")


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    interval_s: float = 10.0
    timeout_s: float = 5.0
    failure_threshold: int = 3  # consecutive failures that take a worker out of rotation
    success_threshold: int = 2  # consecutive successes that bring it back
    endpoint: str = "/health"

    def __post_init__(self) -> None:
        _check(self.interval_s > 0 and self.timeout_s > 0, "health check interval and timeout must be > 0")
        _check(self.failure_threshold >= 1 and self.success_threshold >= 1, "health thresholds must be >= 1")
        _check(self.endpoint.startswith("/"), f"health check endpoint must start with '/', got {self.endpoint!r}")


@dataclass(frozen=True)
class BreakerConfig:
    enabled: bool = True
    failure_threshold: int = 5  # consecutive failed requests that open the circuit
    success_threshold: int = 2  # successes in half-open that close it
    timeout_s: float = 5.0  # how long it stays open (short: health checks do the long-term work)

    def __post_init__(self) -> None:
        _check(self.failure_threshold >= 1 and self.success_threshold >= 1, "circuit breaker thresholds must be >= 1")
        _check(self.timeout_s > 0, f"circuit breaker timeout must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    pd_disaggregation: bool = False
    workers: tuple[WorkerSpec, ...] = ()
    policy: str = "cache_aware"
    prefill_policy: str | None = None  # None: `policy`
    decode_policy: str | None = None
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    load_poll_interval_s: float = 1.0  # /get_load polling, for load-aware policies only
    request_timeout_s: float = 1800.0
    connect_timeout_s: float = 10.0
    max_payload_size: int = 512 * 1024 * 1024
    api_key: str | None = None
    log_level: str = "info"
    encode_urls: tuple[str, ...] = ()  # EPD: image requests are encoded here first
    decode_fallback: bool = True  # PD: with no healthy prefill, a decode prefills the request itself
    dispatch: str = "parallel"  # PD: one of DISPATCH_STYLES
    tokenizer_path: str | None = None  # kv_aware: the served model (None: pdserve's default model)
    discovery: str | None = None  # etcd://HOST:PORT[/PREFIX]: workers come and go as they register there
    # Stream migration: a stream whose worker dies, or sends nothing for stream_stall_timeout_s, continues on
    # another worker (pair) from the tokens already sent, at most migration_limit times (0: off).
    migration_limit: int = 3
    stream_stall_timeout_s: float | None = 30.0

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, f"port must be in 1..65535, got {self.port}")
        for name in ("policy", "prefill_policy", "decode_policy"):
            value = getattr(self, name)
            _check(value is None or value in POLICIES, f"{name} must be one of {POLICIES}, got {value!r}")
        allowed = ("prefill", "decode") if self.pd_disaggregation else ("regular",)
        seen: set[str] = set()
        for w in self.workers:
            _check(w.role in allowed, f"a {w.role} worker ({w.url}) needs "
                                      f"{'no ' if w.role == 'regular' else ''}--pd-disaggregation")
            _check(w.url not in seen, f"worker {w.url} is listed twice")
            seen.add(w.url)
        _check(self.load_poll_interval_s > 0, "load poll interval must be > 0")
        _check(self.request_timeout_s > 0 and self.connect_timeout_s > 0, "timeouts must be > 0")
        _check(self.max_payload_size >= 1024, f"max payload size must be >= 1024, got {self.max_payload_size}")
        _check(self.api_key is None or bool(self.api_key), "api key must not be empty")
        _check(self.dispatch in DISPATCH_STYLES, f"dispatch must be one of {DISPATCH_STYLES}, got {self.dispatch!r}")
        _check(self.migration_limit >= 0, f"migration limit must be >= 0, got {self.migration_limit}")
        _check(self.stream_stall_timeout_s is None or self.stream_stall_timeout_s > 0,
               f"stream stall timeout must be > 0, got {self.stream_stall_timeout_s}")
        if self.discovery is not None:
            from pdserve.discovery import DiscoveryConfig

            DiscoveryConfig.parse(self.discovery)
        _check(self.log_level in LOG_LEVELS, f"log level must be one of {LOG_LEVELS}, got {self.log_level!r}")

    @property
    def effective_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def effective_decode_policy(self) -> str:
        return self.decode_policy or self.policy
