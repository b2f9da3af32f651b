"""SMG's gRPC worker protocol (`sglang.grpc.scheduler.SglangScheduler`, PyPI smg-grpc-proto) in the server process.

`--grpc-port` adds a `grpc.aio` server on the HTTP server's event loop, bound to `--host` only. It runs every
request through the same `GenerationService` as the HTTP routes, so validation, stop handling, metrics, PD
bootstrap and dp-rank routing are shared; `grpc_convert.py` maps the messages.

Generate streams `GenerateStreamChunk`s of new token ids (stream=true) and ends each sample with one
`GenerateComplete` holding all its output ids (both modes); an engine failure ends the call with a gRPC status
instead. A client that cancels the call (SMG drops a leg's stream) and the Abort RPC both abort the engine
request: its KV is freed and it finishes exactly once (a Complete with finish_reason "abort" when the call is
still open). Bad input answers INVALID_ARGUMENT. With `--api-key`, every call needs the metadata
`authorization: Bearer KEY`. Waits on the engine outside Generate have deadlines (`CONTROL_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import hmac
import io
import logging
import os
import time
import zipfile
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from pdserve import __version__
from pdserve.engine.dp_client import loads_per_rank
from pdserve.engine.messages import ProfileRequest
from pdserve.server import grpc_convert as convert
from pdserve.server.errors import APIError, BadRequestError
from pdserve.server.generation import GenResult, merge
from pdserve.server.loads import include_sections
from pdserve.server.state import HEALTH_GENERATE_TIMEOUT_S, ServerState, health_generate, model_info, server_info

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 30.0  # one engine control round trip (load, flush)
PROFILE_STOP_TIMEOUT_S = 300.0  # a stop writes the trace first
HEALTH_TIMEOUT_S = HEALTH_GENERATE_TIMEOUT_S + 10.0
MAX_FLUSH_WAIT_S = 600.0  # FlushCache.timeout_s is capped here
FLUSH_RETRY_S = 0.2
STOP_GRACE_S = 2.0  # open calls get this long at shutdown, then they are cancelled (their requests aborted)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
TOKENIZER_CHUNK_BYTES = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "config.json")
RECENT_ABORTS = 64
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}

Handler = Callable[["SchedulerServicer", object, grpc.aio.ServicerContext], Awaitable[object]]


@dataclass
class GrpcCounters:
    """What the servicer saw of aborts (GetServerInfo's scheduler_info.grpc): proof that a leg got the abort."""

    abort_rpcs: int = 0  # Abort calls
    abort_rpcs_matched: int = 0  # ... that found a running request of theirs
    cancelled_calls: int = 0  # Generate calls the client cancelled before their end
    recent: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=RECENT_ABORTS))

    def to_json(self) -> dict[str, object]:
        return {"abort_rpcs": self.abort_rpcs, "abort_rpcs_matched": self.abort_rpcs_matched,
                "cancelled_calls": self.cancelled_calls, "recent_aborted_ids": list(self.recent)}


def _rpc(method: Handler) -> Handler:
    """Authorise the call, then map pdserve's errors onto gRPC status codes (never a crash of the server)."""

    @functools.wraps(method)
    async def call(self: "SchedulerServicer", request: object, context: grpc.aio.ServicerContext) -> object:
        await self.authorize(context)
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except APIError as e:
            await context.abort(_STATUS.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine did not answer {method.__name__} in time")
        except Exception as e:  # a bug or a dead engine: report it, keep serving
            logger.exception("gRPC %s failed", method.__name__)
            code = grpc.StatusCode.INTERNAL if self.state.client.is_alive() else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"{type(e).__name__}: {e}")
        return None  # unreachable: abort raises

    return call


async def _unimplemented(context: grpc.aio.ServicerContext, what: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by pdserve")


class SchedulerServicer(pb_grpc.SglangSchedulerServicer):
    def __init__(self, state: ServerState, grpc_port: int) -> None:
        self.state = state
        self.grpc_port = grpc_port
        self.counters = GrpcCounters()
        self.calls: dict[str, list[str]] = {}  # open Generate calls: request id -> engine rids
        self.start_time = time.time()
        self.last_receive_time = 0.0
        self._tokenizer_zip: tuple[bytes, str] | None = None
        key = state.config.api_key
        self._auth = f"Bearer {key}".encode() if key else None

    async def authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._auth is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(str(given).encode(), self._auth):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer KEY'")

    # ---- generation -----------------------------------------------------------------------------------
    @_rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        self.last_receive_time = time.time()
        rid, inputs = convert.generate_inputs(request, self.state.gen.new_rid)
        if rid in self.calls:
            raise BadRequestError(f"a request with id {rid!r} is already running", param="request_id")
        self.calls[rid] = [inp.rid for inp in inputs]
        results = [GenResult(inp.rid) for inp in inputs]
        try:
            streams = await self.state.gen.open(inputs)  # a request the engine rejects fails here (400)
            async with aclosing(merge(streams)) as chunks:
                async for i, chunk in chunks:
                    if chunk.error is not None:
                        code = grpc.StatusCode.INTERNAL if self.state.client.is_alive() else grpc.StatusCode.UNAVAILABLE
                        await context.abort(code, f"request {chunk.rid} failed: {chunk.error}")
                    results[i].add(chunk)
                    if request.stream and (chunk.new_ids or chunk.input_logprobs is not None):
                        await context.write(convert.stream_chunk(rid, i, inputs[i], chunk.new_ids, chunk.new_logprobs,
                                                                 chunk.input_logprobs, results[i]))
                    if chunk.finish is not None:
                        await context.write(convert.complete(rid, i, inputs[i], results[i]))
        except asyncio.CancelledError:  # the client went away: closing the streams aborted the requests
            self.counters.cancelled_calls += 1
            self.counters.recent.append(rid)
            logger.info("gRPC Generate %s cancelled by the client; request aborted", rid)
            raise
        finally:
            self.calls.pop(rid, None)

    @_rpc
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        rid = request.request_id
        if not rid:
            raise BadRequestError("request_id is required", param="request_id")
        self.counters.abort_rpcs += 1
        self.counters.recent.append(rid)
        rids = self.calls.get(rid) or ([rid] if rid in self.state.gen.active else [])
        for r in rids:
            self.state.client.abort(r)
        if rids:
            self.counters.abort_rpcs_matched += 1
        logger.info("gRPC Abort %s (%s): %s", rid, request.reason or "no reason given",
                    f"aborted {len(rids)} request(s)" if rids else "not running")
        return pb.AbortResponse(success=bool(rids),
                                message=f"request {rid} " + ("aborted" if rids else "is not running"))

    # ---- health and info ------------------------------------------------------------------------------
    @_rpc
    async def HealthCheck(self, request: pb.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> pb.HealthCheckResponse:
        problem = await asyncio.wait_for(health_generate(self.state), HEALTH_TIMEOUT_S)
        return pb.HealthCheckResponse(healthy=problem is None, message=problem or "healthy")

    @_rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        info, tok, ctx_len = model_info(self.state), self.state.client.tokenizer, self.state.client.ready.context_len
        return pb.GetModelInfoResponse(
            model_path=str(info["model_path"]), tokenizer_path=str(info["tokenizer_path"] or ""), is_generation=True,
            served_model_name=self.state.served_model_name, max_context_length=ctx_len,
            vocab_size=self.state.encoder.vocab_size, supports_vision=bool(server_info(self.state)["is_multimodal"]),
            model_type=str(info["model_type"] or ""), architectures=[str(a) for a in info["architectures"]],
            eos_token_ids=list(self.state.client.eos_token_ids),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 0,
            max_req_input_len=ctx_len - 1,
        )

    @_rpc
    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        args = {**server_info(self.state), "grpc_port": self.grpc_port}
        ready = self.state.client.ready
        start = Timestamp()
        start.FromSeconds(int(self.start_time))
        scheduler = {"max_total_num_tokens": ready.max_total_tokens, "max_req_input_len": ready.context_len - 1,
                     "grpc": self.counters.to_json()}
        return pb.GetServerInfoResponse(
            server_args=convert.to_struct(args), scheduler_info=convert.to_struct(scheduler),
            active_requests=len(self.state.gen.active), is_paused=False, last_receive_timestamp=self.last_receive_time,
            uptime_seconds=time.time() - self.start_time, sglang_version=__version__, server_type="grpc",
            start_time=start, max_total_num_tokens=ready.max_total_tokens,
        )

    @_rpc
    async def GetLoads(self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        try:
            sections = include_sections(request.include)
        except ValueError as e:
            raise BadRequestError(str(e), param="include") from None
        loads = await asyncio.wait_for(loads_per_rank(self.state.client), CONTROL_TIMEOUT_S)
        self.state.metrics.update_loads(loads)
        ranks = range(len(loads))
        if request.HasField("dp_rank"):
            if request.dp_rank not in ranks:
                raise BadRequestError(f"dp_rank {request.dp_rank} is out of range (0..{len(loads) - 1})")
            ranks = range(request.dp_rank, request.dp_rank + 1)
        mode = self.state.config.engine.disaggregation_mode
        out = [convert.scheduler_load(self.state.metrics.engine, r, sections, mode, self.state.weight_bytes)
               for r in ranks]
        return pb.GetLoadsResponse(timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), version=__version__,
                                   dp_rank_count=len(loads), loads=out, aggregate=convert.aggregate(out))

    # ---- control --------------------------------------------------------------------------------------
    @_rpc
    async def FlushCache(self, request: common_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.FlushCacheResponse:
        """Flush now, or retry until the engine is idle for up to timeout_s (capped at MAX_FLUSH_WAIT_S)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(request.timeout_s, 0.0), MAX_FLUSH_WAIT_S)
        while True:
            result = await asyncio.wait_for(self.state.client.flush_cache(), CONTROL_TIMEOUT_S)
            if result.ok or loop.time() >= deadline:
                break
            await asyncio.sleep(min(FLUSH_RETRY_S, max(deadline - loop.time(), 0.0)))
        message = result.message or ("Cache flushed." if result.ok else "cannot flush the cache")
        return common_pb2.FlushCacheResponse(success=result.ok, message=message)

    @_rpc
    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext) -> None:
        """The model's tokenizer files as one zip, in chunks; the last chunk carries its SHA-256 (hex)."""
        if self._tokenizer_zip is None:
            hf_dir = self.state.client.resolved.hf_dir
            self._tokenizer_zip = await asyncio.get_running_loop().run_in_executor(None, _zip_tokenizer, hf_dir)
        data, digest = self._tokenizer_zip
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            last = start + TOKENIZER_CHUNK_BYTES >= len(data)
            await context.write(common_pb2.GetTokenizerChunk(data=data[start:start + TOKENIZER_CHUNK_BYTES],
                                                             sha256=digest if last else ""))

    @_rpc
    async def StartProfile(self, request: common_pb2.StartProfileRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ProfileResponse:
        req = ProfileRequest(
            start=True, output_dir=request.output_dir if request.HasField("output_dir") else None,
            start_step=request.start_step if request.HasField("start_step") else None,
            num_steps=request.num_steps if request.HasField("num_steps") else None,
            activities=tuple(request.activities) or ProfileRequest.activities,
            profile_by_stage=request.profile_by_stage, with_stack=request.with_stack,
            record_shapes=request.record_shapes)
        result = await asyncio.wait_for(self.state.client.profile(req), CONTROL_TIMEOUT_S)
        return common_pb2.ProfileResponse(success=result.ok, message=result.message.strip())

    @_rpc
    async def StopProfile(self, request: common_pb2.StopProfileRequest,
                          context: grpc.aio.ServicerContext) -> common_pb2.ProfileResponse:
        result = await asyncio.wait_for(self.state.client.profile(ProfileRequest(start=False)), PROFILE_STOP_TIMEOUT_S)
        return common_pb2.ProfileResponse(success=result.ok, message=result.message)

    @_rpc
    async def Embed(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "Embed (pdserve serves generation models)")

    @_rpc
    async def SubscribeKvEvents(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "KV cache events (poll GetLoads)")

    @_rpc
    async def LoadLoRAAdapter(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "LoRA adapters")

    @_rpc
    async def UnloadLoRAAdapter(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "LoRA adapters")

    @_rpc
    async def ListLoadedLoRAAdapters(self, request: pb.ListLoadedLoRAAdaptersRequest,
                                     context: grpc.aio.ServicerContext) -> pb.ListLoadedLoRAAdaptersResponse:
        return pb.ListLoadedLoRAAdaptersResponse()  # none: pdserve loads no adapters


def _zip_tokenizer(hf_dir: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in TOKENIZER_FILES:
            path = os.path.join(hf_dir, name)
            if os.path.isfile(path):
                zf.write(path, arcname=name)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


class GrpcFront:
    """The server's gRPC port: bound at construction (before the engine starts, like the HTTP port, so that the
    engine's own sockets cannot take it), serving once `start` has the state."""

    def __init__(self, host: str, port: int) -> None:
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self.server.add_insecure_port(self.address)  # raises RuntimeError when the port cannot be bound
        self.started = False

    async def start(self, state: ServerState) -> None:
        pb_grpc.add_SglangSchedulerServicer_to_server(SchedulerServicer(state, self.port), self.server)
        await self.server.start()
        self.started = True
        logger.info("serving SMG gRPC (SglangScheduler) on grpc://%s", self.address)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Open calls get `grace_s`, then they are cancelled (which aborts their requests)."""
        if not self.started:  # grpc releases a bound port only through a started server's stop
            await self.server.start()
            self.started, grace_s = True, 0.0
        await self.server.stop(grace_s)
