"""Typed messages between the HTTP front process and the engine process (one dataclass per message)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.disagg.messages import BootstrapInfo
from pdserve.engine.stats import EngineStats
from pdserve.model.kernel_plan import KernelPlan
from pdserve.sampling_params import SamplingParams


# ---- front -> engine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    rid: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no input logprobs; else first prompt position to score
    stream: bool = False
    bootstrap: BootstrapInfo | None = None  # set on prefill/decode servers (PD disaggregation)
    mm: Any = None  # image prompts: pdserve.epd.mm.MultimodalInput (spans + pixel values or an EPD room)
    routed_dp_rank: int | None = None  # the data parallel replica the client asked for (--dp-size > 1)


@dataclass(frozen=True)
class AbortRequest:
    rid: str


@dataclass(frozen=True)
class FlushCacheRequest:
    pass


@dataclass(frozen=True)
class LoadRequest:
    pass


@dataclass(frozen=True)
class ShutdownRequest:
    pass


@dataclass(frozen=True)
class ProfileRequest:
    """/start_profile (start=True, SGLang's ProfileReqInput fields) or /stop_profile (start=False)."""

    start: bool
    output_dir: str | None = None  # None: SGLANG_TORCH_PROFILER_DIR, else /tmp
    start_step: int | None = None  # model steps to wait before recording
    num_steps: int | None = None  # stop by itself after this many model steps (None: at /stop_profile)
    activities: tuple[str, ...] = ("CPU", "GPU")  # CPU, GPU (CUDA where present), MEM
    profile_by_stage: bool = False  # one trace per stage: EXTEND (steps with prompt tokens) and DECODE
    with_stack: bool = False
    record_shapes: bool = False
    profile_prefix: str | None = None


# ---- engine -> front -------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """New tokens for one request since its last output; finish_reason set on its last one."""

    rid: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    input_logprobs: list[TokenLogprob | None] | None = None  # on the first output only
    finish_reason: str | None = None  # stop | length | abort
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set with finish_reason="abort" when the engine failed the request
    rejected: bool = False  # the engine refused the request as invalid (a client error, nothing ran)


@dataclass(frozen=True)
class LoadReport:
    num_reqs: int
    num_waiting_reqs: int
    num_tokens: int  # KV slots in use (requests + cache)
    max_total_tokens: int
    num_used_by_reqs: int
    num_cached_tokens: int
    extra: dict[str, int] = field(default_factory=dict)  # mode-specific counters (EPD buffers), shown in /get_load
    stats: EngineStats | None = None  # counters since start, for /metrics (None: several replicas summed)


@dataclass(frozen=True)
class FlushCacheResult:
    ok: bool
    message: str = ""


@dataclass(frozen=True)
class ProfileResult:
    ok: bool
    message: str
    trace_files: tuple[str, ...] = ()  # written so far (a stop that ends the recording)


@dataclass(frozen=True)
class EngineReady:
    max_total_tokens: int
    context_len: int
    model_path: str
    model_type: str
    architectures: tuple[str, ...]
    cpu_kernels: KernelPlan | None = None  # None: not a CPU fp32 model


@dataclass(frozen=True)
class EngineFailed:
    message: str
