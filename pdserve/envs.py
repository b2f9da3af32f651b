"""Every environment variable pdserve honours, read once, here."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def _default_thread_pool_size() -> int:
    return min(max(int(0.75 * (os.cpu_count() or 1)) // 8, 4), 12)


@dataclass(frozen=True)
class Envs:
    disagg_thread_pool_size: int
    disagg_queue_size: int
    disagg_bootstrap_timeout_s: float
    disagg_waiting_timeout_s: float
    disagg_heartbeat_interval_s: float
    disagg_heartbeat_max_failure: int
    disagg_nixl_backend: str
    disagg_auth_token: str  # "" when unset
    disagg_transfer_timeout_s: float
    cache_dir: str
    disable_cpu_kernels: bool
    cpu_isa: str  # "" (auto) or the highest ISA path pdserve's kernels and torch may use: avx512|avx2|portable
    cc: str
    epd_image_max_bytes: int
    epd_image_max_pixels: int
    epd_image_fetch_timeout_s: float
    epd_embedding_timeout_s: float
    epd_embedding_ttl_s: float
    epd_buffer_tokens: int
    step_log: str
    kv_chunk_streaming: bool  # prefill: send each computed chunk's KV while the next computes
    torch_profiler_dir: str  # where /start_profile writes traces when the request names no output_dir
    # Fault injection for tests (off by default): a prefill fails each prompt's KV transfer with this probability,
    # through the real failure path (its writes abandoned, TransferDone(ok=False) to the decode).
    fault_transfer_fail_p: float
    fault_kv_corrupt_p: float  # a decode changes a byte of each prompt's landed KV with this probability
    fault_seed: int | None  # seeds the injection's draws (the same count of failures for the same requests)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_transfer_fail_p <= 1.0:
            raise ValueError(f"PDSERVE_FAULT_TRANSFER_FAIL_P must be in [0, 1], got {self.fault_transfer_fail_p}")
        if not 0.0 <= self.fault_kv_corrupt_p <= 1.0:
            raise ValueError(f"PDSERVE_FAULT_KV_CORRUPT_P must be in [0, 1], got {self.fault_kv_corrupt_p}")


def _read() -> Envs:
    return Envs(
        disagg_thread_pool_size=_int("SGLANG_DISAGGREGATION_THREAD_POOL_SIZE", _default_thread_pool_size()),
        disagg_queue_size=_int("SGLANG_DISAGGREGATION_QUEUE_SIZE", 4),
        disagg_bootstrap_timeout_s=_float("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0),
        disagg_waiting_timeout_s=_float("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300.0),
        disagg_heartbeat_interval_s=_float("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", 5.0),
        disagg_heartbeat_max_failure=_int("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", 2),
        disagg_nixl_backend=os.environ.get("SGLANG_DISAGGREGATION_NIXL_BACKEND", "UCX"),
        disagg_auth_token=os.environ.get("PDSERVE_DISAGGREGATION_AUTH_TOKEN", ""),
        disagg_transfer_timeout_s=_float("PDSERVE_TRANSFER_TIMEOUT", 30.0),
        cache_dir=os.environ.get("PDSERVE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pdserve")),
        disable_cpu_kernels=os.environ.get("PDSERVE_DISABLE_CPU_KERNELS", "") not in ("", "0"),
        cpu_isa=os.environ.get("PDSERVE_CPU_ISA", "").strip().lower(),
        cc=os.environ.get("CC", "gcc"),
        epd_image_max_bytes=_int("PDSERVE_IMAGE_MAX_BYTES", 20 << 20),
        epd_image_max_pixels=_int("PDSERVE_IMAGE_MAX_PIXELS", 40_000_000),
        epd_image_fetch_timeout_s=_float("PDSERVE_IMAGE_FETCH_TIMEOUT", 10.0),
        epd_embedding_timeout_s=_float("PDSERVE_EPD_EMBEDDING_TIMEOUT", 60.0),
        epd_embedding_ttl_s=_float("PDSERVE_EPD_EMBEDDING_TTL", 60.0),
        epd_buffer_tokens=_int("PDSERVE_EPD_BUFFER_TOKENS", 8192),
        step_log=os.environ.get("PDSERVE_STEP_LOG", ""),
        kv_chunk_streaming=os.environ.get("PDSERVE_KV_CHUNK_STREAMING", "1") != "0",
        torch_profiler_dir=os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp"),
        fault_transfer_fail_p=_float("PDSERVE_FAULT_TRANSFER_FAIL_P", 0.0),
        fault_kv_corrupt_p=_float("PDSERVE_FAULT_KV_CORRUPT_P", 0.0),
        fault_seed=_int("PDSERVE_FAULT_SEED", -1) if os.environ.get("PDSERVE_FAULT_SEED") else None,
    )


# PDSERVE_CPU_ISA=avx2|portable also caps torch's own kernels (MKL, oneDNN, ATen), so that a machine with a
# wider ISA runs the whole stack as a machine of the lower kind does. They read these once, at first use: this
# runs when pdserve is imported, which must come before torch's first matmul (a variable already set wins).
TORCH_ISA_CAPS = {
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "portable": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "ATEN_CPU_CAPABILITY": "default"},
}

ENVS = _read()
for _name, _value in TORCH_ISA_CAPS.get(ENVS.cpu_isa, {}).items():
    os.environ.setdefault(_name, _value)
