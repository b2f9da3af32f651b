"""SMG's gRPC worker mode (`--grpc-port`, sglang.grpc.scheduler.SglangScheduler).

Direct: a grpc.aio client from smg-grpc-proto's generated stubs against a unified server gets what HTTP
/generate gives for the same input_ids, plus health, info, loads, flush, tokenizer, cancellation / Abort and
INVALID_ARGUMENT for bad input. Through SMG: a real `smg launch --pd-disaggregation` over grpc:// prefill and
decode workers gives the unified server's greedy text, and a client that disconnects mid-stream aborts both legs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from pdserve.config import ServerConfig
from tests.conftest import ServerProcess, free_port, serve_for_module, stop_server
from tests.pd_helpers import Prefill, response_text, start_decode, start_prefill, stop_all

SMG = shutil.which("smg") or os.path.join(os.path.dirname(sys.executable), "smg")
RPC_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0
MAX_TOKENS = 12
LONG_TOKENS = 2000  # a request that is still running when it gets aborted
CHAT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": MAX_TOKENS, "temperature": 0}
COMPLETION = {"prompt": "The capital of France is", "max_tokens": MAX_TOKENS, "temperature": 0}
GENERATE = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0}}
CASES = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/generate", GENERATE)]


@dataclass
class GrpcServer:
    http: ServerProcess
    grpc_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@dataclass
class SmgPD:
    router: ServerProcess
    prefill: GrpcServer
    decode: GrpcServer


def run(coro):
    return asyncio.run(coro)


async def _call(target: str, method: str, request: object) -> object:
    async with grpc.aio.insecure_channel(target) as channel:
        return await getattr(pb_grpc.SglangSchedulerStub(channel), method)(request, timeout=RPC_TIMEOUT_S)


async def _generate(target: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        return [m async for m in pb_grpc.SglangSchedulerStub(channel).Generate(request, timeout=RPC_TIMEOUT_S)]


def _gen_request(rid: str, ids: list[int], max_new_tokens: int = MAX_TOKENS, **kw) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, skip_special_tokens=True,
                                 ignore_eos=max_new_tokens == LONG_TOKENS)
    return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=ids), sampling_params=sampling,
                              **kw)


def _aborted_total(server: ServerProcess) -> float:
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("sglang:num_aborted_requests_total"):
            return float(line.split()[-1])
    raise AssertionError("no sglang:num_aborted_requests_total in /metrics")


def _num_reqs(server: ServerProcess) -> int:
    return sum(rank["num_reqs"] for rank in httpx.get(server.base_url + "/get_load", timeout=30).json())


def _grpc_counters(server: GrpcServer) -> dict:
    info = run(_call(server.target, "GetServerInfo", pb.GetServerInfoRequest()))
    grpc_stats = info.scheduler_info["grpc"]
    return {"abort_rpcs": grpc_stats["abort_rpcs"], "recent": list(grpc_stats["recent_aborted_ids"])}


def _wait_until(check, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.25)


_GRPC_PORTS_TAKEN: set[int] = set()


def _grpc_port() -> int:
    """A free port below the kernel's ephemeral range, so that no `free_port()` (the servers' HTTP, bootstrap,
    SMG ports) can pick it before the server binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        if port in _GRPC_PORTS_TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GRPC_PORTS_TAKEN.add(port)
        return port
    return free_port()


def _with_grpc_port(args: list[str]) -> tuple[list[str], int]:
    port = _grpc_port()
    return [*args, "--grpc-port", str(port)], port


@pytest.fixture(scope="module")
def unified(request: pytest.FixtureRequest) -> Iterator[GrpcServer]:
    args, port = _with_grpc_port(["--num-threads", "1"])
    for server in serve_for_module(request, args):
        yield GrpcServer(server, port)


# ---- direct gRPC against a unified server ---------------------------------------------------------------
def test_grpc_port_is_validated():
    with pytest.raises(ValueError, match="grpc_port"):
        ServerConfig(port=30000, grpc_port=30000)
    with pytest.raises(ValueError, match="grpc_port"):
        ServerConfig(grpc_port=70000)


@pytest.mark.parametrize("stream", [False, True])
def test_generate_matches_http_generate(unified, tokenizer, stream):
    ids = tokenizer.encode("The quick brown fox")
    ref = httpx.post(unified.http.base_url + "/generate", json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0}}, timeout=120).json()
    msgs = run(_generate(unified.target, _gen_request(f"direct-{stream}", ids, stream=stream)))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    completes = [m.complete for m in msgs if m.HasField("complete")]
    assert len(completes) == 1 and msgs[-1].HasField("complete") and all(m.request_id == f"direct-{stream}"
                                                                         for m in msgs)
    done = completes[0]
    assert list(done.output_ids) == ref["output_ids"]
    assert done.finish_reason == ref["meta_info"]["finish_reason"]["type"] == "length"
    assert done.prompt_tokens == len(ids) and done.completion_tokens == MAX_TOKENS
    if stream:
        assert len(chunks) >= 2 and [t for c in chunks for t in c.token_ids] == ref["output_ids"]
        assert chunks[-1].completion_tokens == MAX_TOKENS and chunks[0].prompt_tokens == len(ids)
    else:
        assert not chunks


def test_generate_n_samples(unified, tokenizer):
    ids = tokenizer.encode("The quick brown fox")
    request = _gen_request("two", ids)
    request.sampling_params.n = 2
    completes = [m.complete for m in run(_generate(unified.target, request)) if m.HasField("complete")]
    assert sorted(c.index for c in completes) == [0, 1]
    assert completes[0].output_ids == completes[1].output_ids  # greedy: the same twice
    assert all(c.completion_tokens == MAX_TOKENS for c in completes)


def test_generate_logprobs_match_http(unified, tokenizer):
    ids = tokenizer.encode("Paris is the capital of")
    ref = httpx.post(unified.http.base_url + "/generate", json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "return_logprob": True,
        "top_logprobs_num": 2, "logprob_start_len": 0}, timeout=120).json()["meta_info"]
    msgs = run(_generate(unified.target, _gen_request("logprobs", ids, max_new_tokens=4, return_logprob=True,
                                                       top_logprobs_num=2, logprob_start_len=0)))
    done = msgs[-1].complete
    out = done.output_logprobs
    assert list(out.token_ids) == [e[1] for e in ref["output_token_logprobs"]]
    assert list(out.token_logprobs) == pytest.approx([e[0] for e in ref["output_token_logprobs"]], abs=1e-4)
    assert [list(t.token_ids) for t in out.top_logprobs] == [[e[1] for e in top] for top in ref["output_top_logprobs"]]
    inp = done.input_logprobs
    assert list(inp.token_ids) == [e[1] for e in ref["input_token_logprobs"]] == ids
    assert not inp.token_logprobs[0].HasField("value")  # the first prompt token has no logprob
    assert [v.value for v in inp.token_logprobs[1:]] == pytest.approx(
        [e[0] for e in ref["input_token_logprobs"][1:]], abs=1e-4)


def test_health_info_loads_flush_tokenizer(unified):
    health = run(_call(unified.target, "HealthCheck", pb.HealthCheckRequest()))
    assert health.healthy, health.message
    info = run(_call(unified.target, "GetModelInfo", pb.GetModelInfoRequest()))
    ref = httpx.get(unified.http.base_url + "/model_info", timeout=30).json()
    assert (info.model_path, info.tokenizer_path, info.max_context_length) == (
        ref["model_path"], ref["tokenizer_path"], ref["context_length"])
    assert info.is_generation and info.vocab_size > 0 and list(info.eos_token_ids)
    server = run(_call(unified.target, "GetServerInfo", pb.GetServerInfoRequest()))
    assert server.server_type == "grpc" and server.server_args["grpc_port"] == unified.grpc_port
    assert server.server_args["port"] == int(unified.http.base_url.rsplit(":", 1)[1])
    loads = run(_call(unified.target, "GetLoads", pb.GetLoadsRequest(include=["all"])))
    http_load = httpx.get(unified.http.base_url + "/get_load", timeout=30).json()[0]
    assert loads.dp_rank_count == 1 and len(loads.loads) == 1
    assert loads.loads[0].max_total_num_tokens == http_load["max_total_tokens"]
    assert loads.loads[0].disaggregation.mode == "null" and loads.aggregate.total_reqs >= 0
    assert loads.loads[0].memory.kv_cache_gb > 0 and loads.loads[0].max_running_requests > 0
    with tempfile.TemporaryDirectory() as out_dir:  # StartProfile / StopProfile record the engine's steps
        started = run(_call(unified.target, "StartProfile", common_pb2.StartProfileRequest(
            output_dir=out_dir, activities=["CPU"])))
        assert started.success, started.message
        run(_generate(unified.target, pb.GenerateRequest(
            request_id="profiled", tokenized=pb.TokenizedInput(input_ids=[1, 2, 3]),
            sampling_params=pb.SamplingParams(max_new_tokens=3))))
        stopped = run(_call(unified.target, "StopProfile", common_pb2.StopProfileRequest()))
        assert stopped.success and os.listdir(out_dir) and out_dir in stopped.message, stopped.message
    flushed = run(_call(unified.target, "FlushCache", common_pb2.FlushCacheRequest(timeout_s=30)))
    assert flushed.success, flushed.message

    async def tokenizer_zip() -> tuple[bytes, str]:
        async with grpc.aio.insecure_channel(unified.target) as channel:
            chunks = [c async for c in pb_grpc.SglangSchedulerStub(channel).GetTokenizer(
                common_pb2.GetTokenizerRequest(), timeout=RPC_TIMEOUT_S)]
        return b"".join(c.data for c in chunks), chunks[-1].sha256

    data, digest = run(tokenizer_zip())
    assert hashlib.sha256(data).hexdigest() == digest
    assert "tokenizer.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()


BAD_REQUESTS = {
    "no tokenized input": ("Generate", pb.GenerateRequest(request_id="bad-1")),
    "empty prompt": ("Generate", pb.GenerateRequest(request_id="bad-2", tokenized=pb.TokenizedInput())),
    "token outside the vocabulary": ("Generate", _gen_request("bad-3", [10**9])),
    "negative temperature": ("Generate", pb.GenerateRequest(
        request_id="bad-4", tokenized=pb.TokenizedInput(input_ids=[1, 2]),
        sampling_params=pb.SamplingParams(temperature=-1.0))),
    "constrained decoding": ("Generate", pb.GenerateRequest(
        request_id="bad-5", tokenized=pb.TokenizedInput(input_ids=[1, 2]),
        sampling_params=pb.SamplingParams(regex="a+"))),
    "too many top logprobs": ("Generate", _gen_request("bad-6", [1, 2], return_logprob=True, top_logprobs_num=99)),
    "negative room": ("Generate", _gen_request("bad-7", [1, 2], disaggregated_params=pb.DisaggregatedParams(
        bootstrap_host="127.0.0.1", bootstrap_room=-5))),
    "unknown load section": ("GetLoads", pb.GetLoadsRequest(include=["bogus"])),
    "abort without id": ("Abort", pb.AbortRequest()),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(unified, name):
    method, request = BAD_REQUESTS[name]

    async def call() -> None:
        async with grpc.aio.insecure_channel(unified.target) as channel:
            result = getattr(pb_grpc.SglangSchedulerStub(channel), method)(request, timeout=RPC_TIMEOUT_S)
            if method == "Generate":
                async for _ in result:
                    pass
            else:
                await result

    with pytest.raises(grpc.aio.AioRpcError) as err:
        run(call())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details()
    assert httpx.get(unified.http.base_url + "/health", timeout=30).status_code == 200


def test_cancel_and_abort_end_the_engine_request(unified, tokenizer):
    ids = tokenizer.encode("Tell me a long story about a dragon.")
    before = _aborted_total(unified.http)

    async def cancel_after_two_chunks() -> None:
        async with grpc.aio.insecure_channel(unified.target) as channel:
            call = pb_grpc.SglangSchedulerStub(channel).Generate(
                _gen_request("cancelled", ids, LONG_TOKENS, stream=True), timeout=RPC_TIMEOUT_S)
            n = 0
            async for _ in call:
                n += 1
                if n == 2:
                    call.cancel()
                    break

    run(cancel_after_two_chunks())
    _wait_until(lambda: _num_reqs(unified.http) == 0 and _aborted_total(unified.http) >= before + 1,
                "the cancelled request leaves the engine as aborted")
    assert _aborted_total(unified.http) == before + 1  # exactly one terminal outcome

    async def abort_after_two_chunks() -> tuple[list[pb.GenerateResponse], pb.AbortResponse, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(unified.target) as channel:
            stub = pb_grpc.SglangSchedulerStub(channel)
            call = stub.Generate(_gen_request("aborted", ids, LONG_TOKENS, stream=True), timeout=RPC_TIMEOUT_S)
            msgs, answer = [], None
            async for m in call:
                msgs.append(m)
                if len(msgs) == 2:
                    answer = await stub.Abort(pb.AbortRequest(request_id="aborted", reason="test"),
                                              timeout=RPC_TIMEOUT_S)
            return msgs, answer, await call.code()

    msgs, answer, code = run(abort_after_two_chunks())
    assert answer.success and code == grpc.StatusCode.OK
    assert [m.complete.finish_reason for m in msgs if m.HasField("complete")] == ["abort"]
    assert msgs[-1].complete.completion_tokens < LONG_TOKENS
    _wait_until(lambda: _num_reqs(unified.http) == 0 and _aborted_total(unified.http) >= before + 2,
                "the Abort RPC's request leaves the engine as aborted")
    assert _aborted_total(unified.http) == before + 2
    unknown = run(_call(unified.target, "Abort", pb.AbortRequest(request_id="never-started")))
    assert not unknown.success


# ---- a real SMG in PD mode over grpc:// workers ------------------------------------------------------------
def _start_smg(prefill: GrpcServer, bootstrap_port: int, decode: GrpcServer, tokenizer_path: str) -> ServerProcess:
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="smg-grpc-", suffix=".log")
    cmd = [SMG, "launch", "--pd-disaggregation", "--prefill", f"grpc://{prefill.target}", str(bootstrap_port),
           "--decode", f"grpc://{decode.target}", "--host", "127.0.0.1", "--port", str(port),
           "--model-path", tokenizer_path, "--tokenizer-path", tokenizer_path,
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)


def _model_id(server: ServerProcess) -> str:
    return httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def smg_pd(request: pytest.FixtureRequest) -> Iterator[SmgPD]:
    if not os.path.exists(SMG):
        pytest.fail("smg is not installed (make setup installs it from requirements.txt)")
    p_extra, p_port = _with_grpc_port([])
    d_extra, d_port = _with_grpc_port([])
    with cf.ThreadPoolExecutor(2) as ex:  # both load the model at once
        fp, fd = ex.submit(start_prefill, "nixl", p_extra), ex.submit(start_decode, "nixl", d_extra)
        prefill_proc: Prefill = fp.result()
        decode_proc = fd.result()
    prefill, decode = GrpcServer(prefill_proc.server, p_port), GrpcServer(decode_proc, d_port)
    tokenizer_path = httpx.get(prefill.http.base_url + "/server_info", timeout=30).json()["tokenizer_path"]
    router = _start_smg(prefill, prefill_proc.bootstrap_port, decode, tokenizer_path)
    try:
        ok = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and router.proc.poll() is None and not ok:
            try:  # ready once the workers are registered and a real request goes through both
                models = httpx.get(router.base_url + "/v1/models", timeout=30).json().get("data")
                ok = bool(models) and httpx.post(router.base_url + "/v1/completions", timeout=60, json={
                    **COMPLETION, "model": models[0]["id"]}).status_code == 200
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        assert ok, f"smg did not serve over gRPC:\n{router.log()[-5000:]}"
        failed_before = request.session.testsfailed
        yield SmgPD(router, prefill, decode)
        if request.session.testsfailed > failed_before:
            for name, proc in (("smg", router), ("prefill", prefill.http), ("decode", decode.http)):
                print(f"\n----- {name} log -----\n{proc.log()[-20000:]}", file=sys.stderr)
    finally:
        stop_server(router)
        stop_all(prefill_proc, decode_proc)
        os.unlink(router.log_path)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", CASES)
def test_smg_grpc_pd_matches_unified(smg_pd, unified, path, body, stream):
    ref = httpx.post(unified.http.base_url + path, timeout=120,
                     json={**body, "stream": stream, "model": _model_id(unified.http)})
    got = httpx.post(smg_pd.router.base_url + path, timeout=120,
                     json={**body, "stream": stream, "model": _model_id(smg_pd.router)})
    assert ref.status_code == 200 and got.status_code == 200, got.text
    assert response_text(path, got, stream) == response_text(path, ref, stream) != ""


def test_smg_grpc_disconnect_aborts_both_legs(smg_pd):
    legs = {"prefill": smg_pd.prefill, "decode": smg_pd.decode}
    aborted_before = _aborted_total(smg_pd.decode.http)
    rpcs_before = {name: _grpc_counters(leg)["abort_rpcs"] for name, leg in legs.items()}
    body = {"model": _model_id(smg_pd.router), "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}
    request_id = None
    with httpx.stream("POST", smg_pd.router.base_url + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                request_id = request_id or json.loads(line[5:])["id"]  # the engine request id both legs got
                seen += 1
                if seen == 3:
                    break  # closing the response disconnects mid-stream
    assert request_id is not None and seen == 3

    def settled() -> bool:
        counters = {name: _grpc_counters(leg) for name, leg in legs.items()}
        return (all(_num_reqs(leg.http) == 0 for leg in legs.values())
                and _aborted_total(smg_pd.decode.http) >= aborted_before + 1
                and all(counters[name]["abort_rpcs"] > rpcs_before[name] and request_id in counters[name]["recent"]
                        for name in legs))

    # The decode was still generating: its request is aborted (KV freed, counted in /metrics). The prefill had
    # already finished its one token and handed the KV over, so SMG's Abort RPC for the same id is all there is
    # left to see on that leg: the servicer's own record of aborts shows it arrived.
    _wait_until(settled, f"both legs saw the abort of {request_id} and hold no requests")
