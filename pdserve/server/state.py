"""Everything the routes need, built once the engine is ready; plus the info/health payloads."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve import __version__
from pdserve.config import EngineConfig, ServerConfig
from pdserve.discovery import advertised_host
from pdserve.engine.dp_client import loads_per_rank
from pdserve.model.loader import model_display_name
from pdserve.sampling_params import SamplingParams
from pdserve.epd.front import MultimodalFront
from pdserve.server.loads import checkpoint_bytes
from pdserve.server.generation import GenerationService, GenInput, GenResult, collect
from pdserve.server.metrics import ServerMetrics, engine_type_of
from pdserve.server.native_api import NativeServing
from pdserve.server.openai_api import OpenAIServing, PDRole
from pdserve.server.tokenization import PromptEncoder

if TYPE_CHECKING:
    from pdserve.engine.client import EngineClient
    from pdserve.engine.dp_client import DataParallelClient

logger = logging.getLogger(__name__)
HEALTH_GENERATE_TIMEOUT_S = 60.0
DRAIN_POLL_S = 0.05
KV_PENDING_POLL_S = 0.25


class Drain:
    """A graceful drain (SIGTERM or POST /drain): from `begin` on, new requests are refused with 503 and /health
    answers 503 (routers take the server out of rotation); the requests in flight finish (a prefill's answer ends
    only once its KV reached the decode, so its KV is kept until then; a prefill-first answer goes out first, so
    the drain also waits for the KV it holds for decodes to be claimed and written, or its lease to run out);
    then the server stops."""

    def __init__(self, gen: GenerationService, timeout_s: float) -> None:
        self.gen, self.timeout_s = gen, timeout_s
        self.requested = asyncio.Event()  # the server's watch loop waits on it
        self.reason = ""

    @property
    def started(self) -> bool:
        return self.gen.draining

    def begin(self, reason: str) -> None:
        if self.gen.draining:
            return
        self.gen.draining, self.reason = True, reason
        logger.info("draining (%s): %d requests in flight; new requests get 503", reason, len(self.gen.active))
        self.requested.set()

    async def wait_drained(self, alive) -> bool:
        """Until no request is in flight (True), the timeout passes or `alive()` turns False (False)."""
        deadline = time.monotonic() + self.timeout_s
        while self.gen.active and time.monotonic() < deadline and alive():
            await asyncio.sleep(DRAIN_POLL_S)
        if self.gen.active:
            return False
        pending = await self._kv_pending()
        while pending and time.monotonic() < deadline and alive():
            await asyncio.sleep(KV_PENDING_POLL_S)
            pending = await self._kv_pending()
        return not pending

    async def _kv_pending(self) -> int:
        """Answered requests whose KV a prefill still holds or writes for a decode (prefill first)."""
        try:
            loads = await loads_per_rank(self.gen.client)
        except Exception:  # noqa: BLE001 - the engine is gone: nothing is pending there any more
            return 0
        return sum(load.extra.get("kv_pending_reqs", 0) for load in loads)


@dataclass
class ServerState:
    config: ServerConfig
    client: "EngineClient | DataParallelClient"  # the latter with --dp-size > 1
    served_model_name: str
    model_path: str
    metrics: ServerMetrics
    encoder: PromptEncoder
    gen: GenerationService
    native: NativeServing
    openai: OpenAIServing
    drain: Drain
    weight_bytes: int = 0  # the checkpoint's weight files on disk (/v1/loads memory.weight_gb)


def build_state(config: ServerConfig, client: "EngineClient | DataParallelClient") -> ServerState:
    model_path = os.path.abspath(client.resolved.source_path)
    # SMG routes OpenAI requests by this name: the model's name, not a path (requests naming the path work too)
    served = config.engine.model.served_model_name or model_display_name(model_path)
    metrics = ServerMetrics(served, engine_type_of(config.engine.disaggregation_mode), config.engine.dp_size)
    mm = MultimodalFront(client.resolved.hf_dir, config.engine, config.api_key)
    encoder = PromptEncoder(client.tokenizer, client.resolved.hf_dir, mm.image_token)
    gen = GenerationService(client, client.tokenizer, metrics, client.ready.context_len, encoder.vocab_size,
                            client.eos_token_ids, dp_size=config.engine.dp_size)
    return ServerState(
        config=config, client=client, served_model_name=served, model_path=model_path, metrics=metrics,
        encoder=encoder, gen=gen, native=NativeServing(gen, encoder, mm),
        openai=OpenAIServing(gen, encoder, served, strict_model=config.engine.model.served_model_name is not None,
                             mm=mm, aliases=(model_path, config.engine.model.model_path or model_path),
                             pd=pd_role(config.engine)),
        drain=Drain(gen, config.drain_timeout_s),
        weight_bytes=checkpoint_bytes(client.resolved.hf_dir),
    )


def pd_role(eng: EngineConfig) -> PDRole:
    host = advertised_host(eng.host)
    return PDRole(eng.disaggregation_mode, host, eng.bootstrap_port,
                  eng.instance_id or f"{host}:{eng.bootstrap_port}", eng.tp_size)


def kv_events_endpoints(eng: EngineConfig, host: str) -> list[str]:
    """Where the replicas publish KV events, on `host` (the advertised one, PDRole.bootstrap_host)."""
    if eng.kv_events is None:
        return []
    return [eng.kv_events.address(host, rank) for rank in range(eng.dp_size)]


def server_info(state: ServerState) -> dict[str, object]:
    """Flat, SGLang-style server arguments plus runtime facts (never the API key)."""
    cfg, eng, ready = state.config, state.config.engine, state.client.ready
    return {
        "model_path": state.model_path,
        "tokenizer_path": state.client.resolved.hf_dir,
        "served_model_name": state.served_model_name,
        "host": cfg.host,
        "port": cfg.port,
        "dtype": eng.model.dtype,
        "device": eng.model.device,
        "tp_size": eng.tp_size,
        "dp_size": eng.dp_size,
        "enable_dp_attention": cfg.enable_dp_attention,
        "page_size": eng.page_size,
        "max_running_requests": eng.max_running_requests,
        "max_total_tokens": state.client.ready.max_total_tokens,  # of one replica
        "context_length": state.client.ready.context_len,
        "chunked_prefill_size": eng.chunked_prefill_size,
        "max_prefill_tokens": eng.max_prefill_tokens,
        "disable_radix_cache": eng.disable_radix_cache,
        "mem_fraction_static": eng.mem_fraction_static,
        "num_threads": eng.num_threads,
        "random_seed": eng.seed,
        "disaggregation_mode": eng.disaggregation_mode,
        "disaggregation_transfer_backend": eng.transfer_backend,
        "disaggregation_bootstrap_port": eng.bootstrap_port,
        "disaggregation_ib_device": eng.ib_device,
        # where this server's replicas publish KV cache events (--kv-events-config; a KV-aware router subscribes)
        "kv_events_endpoints": kv_events_endpoints(eng, state.openai.pd.bootstrap_host),
        "kv_events_topic": eng.kv_events.topic if eng.kv_events is not None else None,
        "encoder_disaggregated": eng.language_only,
        "encoder_urls": list(eng.encoder_urls),
        "is_multimodal": state.openai.mm is not None and state.openai.mm.spec is not None,
        "api_key_set": cfg.api_key is not None,
        "log_level": cfg.log_level,
        "is_generation": True,
        "cpu_kernels": ready.cpu_kernels.to_json() if ready.cpu_kernels is not None else {"isa": "none"},
        "version": __version__,
        "draining": state.drain.started,
        "internal_states": internal_states(state),
    }


def internal_states(state: ServerState) -> list[dict[str, object]]:
    """SGLang's per-dp-rank scheduler state in /server_info (what bench_serving and mini_lb read)."""
    engine = state.metrics.engine
    out = []
    for rank in range(engine.num_ranks):
        values = engine.rank_values(rank)
        out.append({
            "dp_rank": rank, "last_gen_throughput": values["gen_throughput"], "avg_spec_accept_length": None,
            "num_running_reqs": int(values["num_running_reqs"]), "num_queue_reqs": int(values["num_queue_reqs"]),
            "token_usage": values["token_usage"], "cache_hit_rate": values["cache_hit_rate"],
            "memory_usage": {"kv_cache": round(state.metrics.engine.rank_kv_cache_bytes(rank) / 2**30, 4),
                             "weight": round(state.weight_bytes / 2**30, 4)},
        })
    return out


def model_info(state: ServerState) -> dict[str, object]:
    ready = state.client.ready
    return {
        "model_path": state.model_path,
        "tokenizer_path": state.client.resolved.hf_dir,
        "served_model_name": state.served_model_name,
        "model_type": ready.model_type or state.client.resolved.model_type,
        "architectures": list(ready.architectures) or [state.client.resolved.architecture],
        "is_generation": True,
        "context_length": ready.context_len,
    }


async def health_generate(state: ServerState) -> str | None:
    """Run one real token through the engine (each replica with --dp-size); None when healthy, else why not."""
    if not state.client.is_alive():
        return "the engine process is not running"
    if state.drain.started:
        return "draining"
    if state.config.engine.disaggregation_mode in ("prefill", "decode"):
        # A PD half cannot finish a request alone: check that the engine loop answers instead.
        try:
            await asyncio.wait_for(state.client.get_load(), HEALTH_GENERATE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            return f"engine did not answer: {e}"
        return None
    dp_size = state.config.engine.dp_size
    base_rid, ids = f"HEALTH_CHECK_{state.gen.new_rid()}", state.encoder.encode_text("Hello") or [0]
    inputs = [
        GenInput(rid=base_rid if dp_size == 1 else f"{base_rid}-{rank}", input_ids=ids,
                 sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
                 routed_dp_rank=None if dp_size == 1 else rank)
        for rank in range(dp_size)
    ]

    async def one_token_each() -> list[GenResult]:
        streams = await state.gen.open(inputs)
        return await asyncio.gather(*(collect(s, inp.rid) for s, inp in zip(streams, inputs)))

    try:
        results = await asyncio.wait_for(one_token_each(), HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"no token within {HEALTH_GENERATE_TIMEOUT_S:.0f} s"
    except Exception as e:  # any failure means unhealthy, and says why
        return f"{type(e).__name__}: {e}"
    errors = [r.error if dp_size == 1 else f"dp rank {rank}: {r.error}"
              for rank, r in enumerate(results) if r.error is not None]
    return "; ".join(errors) or None
