"""SMG's SglangScheduler gRPC messages <-> pdserve's own request and output types: pure functions, no I/O.

The gateway has tokenised, so a GenerateRequest carries token ids. Its sampling params become pdserve's
`SamplingParams` (validated there); its `DisaggregatedParams` become the same `BootstrapInfo` the HTTP fields
bootstrap_host / bootstrap_port / bootstrap_room give (`protocol.bootstrap_info`), so a prefill and a decode
pair up over gRPC exactly as over HTTP. Every problem raises `BadRequestError` (INVALID_ARGUMENT on the wire).

proto3 cannot tell an unset scalar from its zero; where zero cannot be meant it reads as unset: top_p 0 -> 1,
top_k 0 -> -1 (disabled), repetition_penalty 0 -> 1, n 0 -> 1. An unset max_new_tokens means the rest of the
context (as OpenAI chat); temperature 0 is greedy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from google.protobuf.struct_pb2 import Struct
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from pdserve.engine.messages import TokenLogprob
from pdserve.engine.stats import EngineStats, PDStats
from pdserve.sampling_params import MAX_INT32, SamplingParams
from pdserve.server.errors import BadRequestError
from pdserve.server.generation import GenInput, GenResult
from pdserve.server.loads import aggregate_loads, core_load, disagg_mode_name
from pdserve.server.metrics import EngineCollector
from pdserve.server.protocol import MAX_N, MAX_TOP_LOGPROBS, bootstrap_info, routed_dp_rank, sampling_for_choice

_UNSUPPORTED_FIELDS = {  # GenerateRequest fields pdserve cannot honour: refused rather than ignored
    "input_embeds": "input_embeds (embeddings instead of token ids)",
    "lora_id": "LoRA adapters (lora_id)",
    "custom_logit_processor": "custom logit processors",
    "token_ids_logprob": "token_ids_logprob",
    "return_hidden_states": "return_hidden_states",
}


# ---- requests -----------------------------------------------------------------------------------------
def sampling_from_proto(msg: pb.SamplingParams) -> tuple[SamplingParams, int]:
    """(pdserve sampling params, number of samples n)."""
    constraint = msg.WhichOneof("constraint")
    if constraint is not None:
        raise BadRequestError(f"constrained decoding ({constraint}) is not supported", param=constraint)
    d: dict[str, object] = {
        "temperature": msg.temperature,
        "top_p": msg.top_p or 1.0,
        "top_k": msg.top_k or -1,
        "min_p": msg.min_p,
        "frequency_penalty": msg.frequency_penalty,
        "presence_penalty": msg.presence_penalty,
        "repetition_penalty": msg.repetition_penalty or 1.0,
        "max_new_tokens": msg.max_new_tokens if msg.HasField("max_new_tokens") else MAX_INT32,
        "min_new_tokens": msg.min_new_tokens,
        "stop": list(msg.stop),
        "stop_token_ids": list(msg.stop_token_ids),
        "ignore_eos": msg.ignore_eos,
        "skip_special_tokens": msg.skip_special_tokens,
        "spaces_between_special_tokens": msg.spaces_between_special_tokens,
        "no_stop_trim": msg.no_stop_trim,
        "logit_bias": dict(msg.logit_bias),
    }
    try:
        sampling = SamplingParams.from_dict(d)
    except (ValueError, TypeError) as e:
        raise BadRequestError(str(e), param="sampling_params") from None
    n = msg.n or 1
    if not 1 <= n <= MAX_N:
        raise BadRequestError(f"n must be in [1, {MAX_N}], got {n}", param="n")
    return sampling, n


def generate_inputs(req: pb.GenerateRequest, new_rid: Callable[[], str]) -> tuple[str, list[GenInput]]:
    """(the request's id, one GenInput per sample: the id itself, or id-0, id-1, ... for n > 1)."""
    for name, what in _UNSUPPORTED_FIELDS.items():
        if getattr(req, name):
            raise BadRequestError(f"{what} is not supported by pdserve", param=name)
    if req.HasField("mm_inputs") and req.mm_inputs.ListFields():
        raise BadRequestError("multimodal inputs are not supported over gRPC (use the HTTP API)", param="mm_inputs")
    if not req.HasField("tokenized"):
        raise BadRequestError("tokenized.input_ids is required (the gateway tokenises)", param="tokenized")
    if req.HasField("sampling_params"):
        sampling, n = sampling_from_proto(req.sampling_params)
    else:
        sampling, n = SamplingParams(max_new_tokens=MAX_INT32), 1
    if not 0 <= req.top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs_num}",
                              param="top_logprobs_num")
    bootstrap = None
    if req.HasField("disaggregated_params"):  # the room may be 0: presence, not truth, says it is there
        dp = req.disaggregated_params
        bootstrap = bootstrap_info(dp.bootstrap_host or None, dp.bootstrap_port or None, dp.bootstrap_room)
    if bootstrap is not None and n > 1:
        raise BadRequestError("n > 1 is not supported with disaggregated_params (PD)", param="n")
    dp_rank = routed_dp_rank(req.data_parallel_rank if req.HasField("data_parallel_rank") else None, None)
    rid = req.request_id or new_rid()
    ids = list(req.tokenized.input_ids)
    inputs = [
        GenInput(rid=rid if n == 1 else f"{rid}-{i}", input_ids=ids, sampling=sampling_for_choice(sampling, i),
                 return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num,
                 logprob_start_len=req.logprob_start_len, stream=req.stream, bootstrap=bootstrap,
                 routed_dp_rank=dp_rank)
        for i in range(n)
    ]
    return rid, inputs


# ---- responses ----------------------------------------------------------------------------------------
def _top(lps: Sequence[TokenLogprob | None], k: int) -> list[pb.TopLogProbs]:
    return [pb.TopLogProbs(values=[v for _, v in lp.top[:k]] if lp else [],
                           token_ids=[t for t, _ in lp.top[:k]] if lp else []) for lp in lps]


def output_logprobs(lps: Sequence[TokenLogprob], k: int) -> pb.OutputLogProbs:
    return pb.OutputLogProbs(token_logprobs=[lp.logprob for lp in lps], token_ids=[lp.token_id for lp in lps],
                             top_logprobs=_top(lps, k) if k > 0 else [])


def input_logprobs(lps: Sequence[TokenLogprob | None], input_ids: Sequence[int], k: int) -> pb.InputLogProbs:
    """The prompt's logprobs (the first position has none); entries without one still name their token."""
    ids = input_ids[len(input_ids) - len(lps):] if lps else []
    return pb.InputLogProbs(
        token_logprobs=[pb.InputTokenLogProb(value=lp.logprob) if lp else pb.InputTokenLogProb() for lp in lps],
        token_ids=[lp.token_id if lp else tok for lp, tok in zip(lps, ids)],
        top_logprobs=_top(lps, k) if k > 0 else [],
    )


def stream_chunk(rid: str, index: int, inp: GenInput, new_ids: Sequence[int], new_lps: Sequence[TokenLogprob],
                 in_lps: Sequence[TokenLogprob | None] | None, r: GenResult) -> pb.GenerateResponse:
    """New token ids with cumulative counts; logprobs of the new tokens, the prompt's on the first chunk."""
    chunk = pb.GenerateStreamChunk(token_ids=list(new_ids), prompt_tokens=r.prompt_tokens,
                                   completion_tokens=r.completion_tokens, cached_tokens=r.cached_tokens, index=index)
    if inp.return_logprob:
        chunk.output_logprobs.CopyFrom(output_logprobs(new_lps, inp.top_logprobs_num))
        if in_lps is not None:
            chunk.input_logprobs.CopyFrom(input_logprobs(in_lps, inp.input_ids, inp.top_logprobs_num))
    return pb.GenerateResponse(request_id=rid, chunk=chunk)


def complete(rid: str, index: int, inp: GenInput, r: GenResult) -> pb.GenerateResponse:
    """The sample's end: every output id (streamed or not), finish reason, matched stop, counts."""
    finish = r.finish
    msg = pb.GenerateComplete(output_ids=r.output_ids, finish_reason=finish.type if finish else "abort",
                              prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                              cached_tokens=r.cached_tokens, index=index)
    if finish is not None and finish.type == "stop":
        if isinstance(finish.matched, int) and finish.matched >= 0:
            msg.matched_token_id = finish.matched
        elif isinstance(finish.matched, str):
            msg.matched_stop_str = finish.matched
    if inp.return_logprob:
        msg.output_logprobs.CopyFrom(output_logprobs(r.output_logprobs, inp.top_logprobs_num))
        if r.input_logprobs is not None:
            msg.input_logprobs.CopyFrom(input_logprobs(r.input_logprobs, inp.input_ids, inp.top_logprobs_num))
    return pb.GenerateResponse(request_id=rid, complete=msg)


def scheduler_load(engine: EngineCollector, rank: int, sections: set[str], mode: str,
                   weight_bytes: int) -> pb.SchedulerLoad:
    """One dp rank's GetLoads entry, from the same figures as /metrics and /v1/loads (server/metrics.py)."""
    values, load = engine.rank_values(rank), engine.rank_load(rank)
    stats = load.stats or EngineStats()
    out = pb.SchedulerLoad(**core_load(engine, rank))
    if "memory" in sections:
        out.memory.CopyFrom(pb.MemoryMetrics(weight_gb=weight_bytes / 1e9, kv_cache_gb=stats.kv_cache_bytes / 1e9,
                                             token_capacity=load.max_total_tokens))
    if "disagg" in sections:
        pd = stats.pd or PDStats()
        out.disaggregation.CopyFrom(pb.DisaggregationMetrics(
            mode=disagg_mode_name(mode),
            prefill_prealloc_queue_reqs=pd.num_prefill_prealloc_queue_reqs,
            prefill_inflight_queue_reqs=pd.num_prefill_inflight_queue_reqs,
            decode_prealloc_queue_reqs=pd.num_decode_prealloc_queue_reqs,
            decode_transfer_queue_reqs=pd.num_decode_transfer_queue_reqs,
            kv_transfer_speed_gb_s=pd.last_transfer.speed_gb_s, kv_transfer_latency_ms=pd.last_transfer.latency_ms))
    if "queues" in sections:
        out.queues.CopyFrom(pb.QueueMetrics(waiting=load.num_waiting_reqs, retracted=int(values["num_retracted_reqs"])))
    return out


def aggregate(loads: Sequence[pb.SchedulerLoad]) -> pb.AggregateMetrics:
    """The same aggregate as /v1/loads (server/loads.aggregate_loads)."""
    fields = ("num_running_reqs", "num_waiting_reqs", "token_usage", "gen_throughput", "utilization")
    return pb.AggregateMetrics(**aggregate_loads([{f: getattr(x, f) for f in fields} for x in loads]))


def to_struct(d: dict[str, object]) -> Struct:
    """A JSON-like dict as a protobuf Struct (what JSON cannot hold becomes its str())."""
    s = Struct()
    s.update(json.loads(json.dumps(d, default=str)))
    return s
