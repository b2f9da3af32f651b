"""What a benchmark run is asked to do (`BenchConfig`), validated once; plain data, no argparse."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

DATASETS = ("random", "shared-prefix", "interference")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DEFAULT_NUM_PROMPTS = 1000  # random dataset, as SGLang's bench_serving


@dataclass(frozen=True)
class Slo:
    """Latency SLOs of goodput, in ms (None: not checked)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None  # a request's own p99 gap between output tokens
    itl_max_ms: float | None = None  # a request's longest gap

    def scaled(self, factor: float) -> Slo:
        return Slo(*(None if v is None else v * factor for v in (self.ttft_ms, self.tpot_ms, self.itl_ms,
                                                                 self.itl_max_ms)))


@dataclass
class BenchConfig:
    """One run against one OpenAI-compatible endpoint. Times in seconds unless the name says otherwise."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    label: str | None = None  # a name for this run in side-by-side tables and plots

    dataset: str = "random"
    num_prompts: int | None = None  # None: the dataset's natural count (random: 1000)
    seed: int = 1

    # random
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 1.0

    # shared-prefix
    num_groups: int = 4
    prompts_per_group: int = 8
    system_prompt_len: int = 1024
    question_len: int = 64
    shared_prefix_output_len: int = 64

    # interference
    num_decode_streams: int = 4
    decode_input_len: int = 32
    decode_output_len: int = 256
    num_long_prompts: int = 4
    long_prompt_len: int = 2048
    long_prompt_output_len: int = 8
    long_prompt_rate: float = 0.5  # arrivals per second, evenly spaced
    long_prompt_delay: float = 2.0  # seconds after the decode streams start before the first long prompt
    short_request_rate: float = 0.0  # Poisson arrivals per second of short requests while long prompts run
    short_output_len: int = 16
    max_decode_restarts: int = 100  # per stream: bounded count even when long prompts take long
    min_decode_duration: float = 0.0  # seconds the decode streams keep restarting for, long prompts or none

    # load shape (random and shared-prefix; interference has its own schedule)
    request_rate: float = math.inf  # Poisson arrivals per second; inf sends everything at once
    max_concurrency: int | None = None

    warmup_requests: int = 1
    timeout: float = 600.0  # per request, whole stream
    duration_limit: float = 3600.0  # whole measured run; requests still running then are cancelled
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_request_body: dict[str, Any] = field(default_factory=dict)

    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_itl_ms: float | None = None  # each request's p99 gap between output tokens
    slo_itl_max_ms: float | None = None  # each request's longest gap
    slo_scales: tuple[float, ...] = ()  # attainment and goodput with every SLO times each factor

    progress: bool = True  # tqdm bar on stderr

    # --profile: torch profiler traces of the measured run, written by the workers (SGLang's bench_serving flags)
    profile: bool = False
    pd_separated: bool = False  # profile each prefill and decode worker directly (their URLs below)
    profile_prefill_urls: tuple[str, ...] = ()
    profile_decode_urls: tuple[str, ...] = ()
    profile_activities: tuple[str, ...] = ("CPU", "GPU")
    profile_num_steps: int | None = None  # None: until the run ends
    profile_by_stage: bool = False
    profile_output_dir: str | None = None  # None: the worker's SGLANG_TORCH_PROFILER_DIR (else /tmp)

    def validate(self) -> BenchConfig:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None or (v < 0 if allow_zero else v <= 0):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.num_prompts is not None:
            positive("num_prompts")
        for name in ("random_input_len", "random_output_len", "num_groups", "prompts_per_group",
                     "system_prompt_len", "question_len", "shared_prefix_output_len", "num_decode_streams",
                     "decode_input_len", "decode_output_len", "long_prompt_len", "long_prompt_output_len",
                     "long_prompt_rate", "short_output_len", "request_rate", "timeout", "duration_limit"):
            positive(name)
        for name in ("num_long_prompts", "short_request_rate", "long_prompt_delay", "max_decode_restarts",
                     "min_decode_duration", "warmup_requests"):
            positive(name, allow_zero=True)
        if not 0.0 <= self.random_range_ratio <= 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1], got {self.random_range_ratio}")
        if self.max_concurrency is not None:
            positive("max_concurrency")
        if any(not f > 0 for f in self.slo_scales):
            raise ValueError(f"slo_scales must be positive factors, got {list(self.slo_scales)}")
        if self.slo_scales and self.slo == Slo():
            raise ValueError("slo_scales needs an SLO to scale (--slo-ttft-ms, --slo-tpot-ms, --slo-itl-ms, ...)")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_itl_ms", "slo_itl_max_ms"):
            if getattr(self, name) is not None:
                positive(name)
        if self.profile and self.pd_separated and not (self.profile_prefill_urls or self.profile_decode_urls):
            raise ValueError("profile_prefill_url / profile_decode_url: --pd-separated needs the workers' URLs")
        for url in (*self.profile_prefill_urls, *self.profile_decode_urls):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"profile_url must start with http:// or https://, got {url!r}")
        if self.profile_num_steps is not None:
            positive("profile_num_steps")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        return self

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def is_chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")

    @property
    def slo(self) -> Slo:
        return Slo(self.slo_ttft_ms, self.slo_tpot_ms, self.slo_itl_ms, self.slo_itl_max_ms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")  # never written to result files
        d["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return d
