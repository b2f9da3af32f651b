"""Data parallelism (--dp-size): the dispatch rule, the core split, the request fields, and one real server with two
engine replicas."""

from __future__ import annotations

import asyncio
import multiprocessing

import httpx
import pytest

from pdserve.config import EngineConfig, ServerConfig
from pdserve.disagg.messages import BootstrapInfo
from pdserve.engine.dp_client import (
    DataParallelClient,
    pick_dp_rank,
    replica_configs,
    split_engine_cpus,
    sum_loads,
)
from pdserve.engine.messages import FlushCacheResult, GenerateRequest, LoadReport, RequestOutput
from pdserve.sampling_params import SamplingParams
from pdserve.server.args import parse_serve_args
from pdserve.server.errors import BadRequestError
from pdserve.server.protocol import parse_chat, parse_completion, parse_generate
from tests.conftest import serve_for_module


def _req(rid: str = "r", routed: int | None = None, room: int | None = None) -> GenerateRequest:
    bootstrap = BootstrapInfo("127.0.0.1", 8998, room) if room is not None else None
    return GenerateRequest(rid, (1, 2, 3), SamplingParams(max_new_tokens=1), bootstrap=bootstrap,
                           routed_dp_rank=routed)


# ---- the dispatch rule ---------------------------------------------------------------------------------------
def test_routed_rank_wins_over_room_and_load():
    assert pick_dp_rank(_req(routed=1, room=4), 2, [0, 9]) == 1
    assert pick_dp_rank(_req(routed=0), 3, [5, 0, 0]) == 0


@pytest.mark.parametrize("rank", [2, 7])
def test_routed_rank_out_of_range_is_refused(rank):
    with pytest.raises(ValueError, match=f"routed_dp_rank {rank} is out of range.*dp_size 2"):
        pick_dp_rank(_req(routed=rank), 2, [0, 0])


def test_pd_requests_follow_the_bootstrap_room():
    for room in (0, 1, 2, 5, (1 << 63) - 1):
        assert pick_dp_rank(_req(room=room), 4, [9, 9, 9, 0]) == room % 4


def test_others_go_to_the_least_loaded_lowest_rank_first():
    assert pick_dp_rank(_req(), 3, [0, 0, 0]) == 0
    assert pick_dp_rank(_req(), 3, [2, 1, 1]) == 1
    assert pick_dp_rank(_req(), 3, [1, 1, 0]) == 2
    assert pick_dp_rank(_req(), 1, [7]) == 0


# ---- replicas and cores --------------------------------------------------------------------------------------
def test_engine_cpus_are_split_evenly():
    assert split_engine_cpus((), 3) == [(), (), ()]
    assert split_engine_cpus((4, 5, 6, 7), 2) == [(4, 5), (6, 7)]
    assert split_engine_cpus((0, 1, 2, 3, 4), 2) == [(0, 1, 2), (3, 4)]
    with pytest.raises(ValueError, match="2 cores for 3 data parallel replicas"):
        split_engine_cpus((0, 1), 3)
    with pytest.raises(ValueError, match="each replica needs at least one"):
        ServerConfig(engine=EngineConfig(dp_size=3, engine_cpus=(0, 1)))


def test_replica_configs():
    configs = replica_configs(EngineConfig(dp_size=2, engine_cpus=(2, 3), num_threads=1))
    assert [(c.dp_rank, c.engine_cpus, c.num_threads) for c in configs] == [(0, (2,), 1), (1, (3,), 1)]


def test_flags():
    config = parse_serve_args(["--dp-size", "2", "--enable-dp-attention"])
    assert config.engine.dp_size == 2 and config.enable_dp_attention
    assert not parse_serve_args([]).enable_dp_attention


def test_loads_sum():
    total = sum_loads([LoadReport(1, 2, 3, 100, 1, 2, {"x": 1}), LoadReport(4, 5, 6, 100, 3, 3, {"x": 2, "y": 1})])
    assert total == LoadReport(5, 7, 9, 200, 4, 5, {"x": 3, "y": 1})


# ---- request fields ------------------------------------------------------------------------------------------
def test_both_field_names_are_parsed():
    assert parse_generate({"text": "a", "routed_dp_rank": 1}).items[0].routed_dp_rank == 1
    assert parse_generate({"text": "a", "data_parallel_rank": 1}).items[0].routed_dp_rank == 1
    assert parse_generate({"text": ["a", "b"], "routed_dp_rank": [0, 1]}).items[1].routed_dp_rank == 1
    assert parse_generate({"text": "a", "disagg_prefill_dp_rank": 3}).items[0].routed_dp_rank is None
    assert parse_generate({"text": "a"}).items[0].routed_dp_rank is None
    assert parse_completion({"prompt": "a", "routed_dp_rank": 1}).common.routed_dp_rank == 1
    chat = parse_chat({"messages": [{"role": "user", "content": "a"}], "data_parallel_rank": 0})
    assert chat.common.routed_dp_rank == 0
    for body in ({"text": "a", "routed_dp_rank": -1}, {"text": "a", "routed_dp_rank": "0"},
                 {"text": "a", "routed_dp_rank": 0, "data_parallel_rank": 1}):
        with pytest.raises(BadRequestError):
            parse_generate(body)


# ---- the client, over stub replicas -----------------------------------------------------------------------------
class _StubReplica:
    def __init__(self, rank: int) -> None:
        self.rank, self.aborted, self.gate = rank, [], asyncio.Event()
        self.resolved = self.tokenizer = self.ready = None
        self.eos_token_ids = (0,)

    async def generate(self, req: GenerateRequest):
        await self.gate.wait()
        yield RequestOutput(req.rid, [self.rank], finish_reason="length")

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    def is_alive(self) -> bool:
        return True

    async def get_load(self) -> LoadReport:
        return LoadReport(self.rank, 0, 0, 10, 0, 0)

    async def flush_cache(self) -> FlushCacheResult:
        return FlushCacheResult(self.rank == 0, "busy")


def test_client_dispatch_abort_and_control():
    async def main() -> None:
        replicas = [_StubReplica(0), _StubReplica(1)]
        client = DataParallelClient(EngineConfig(dp_size=2), replicas)  # type: ignore[arg-type]
        streams = [client.generate(_req(f"r{i}")) for i in range(3)]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0)
        assert [client.rank_of(f"r{i}") for i in range(3)] == [0, 1, 0] and client.inflight == [2, 1]
        client.abort("r1")
        client.abort("unknown")
        assert replicas[0].aborted == ["unknown"] and replicas[1].aborted == ["r1", "unknown"]
        for r in replicas:
            r.gate.set()
        assert [(await f).new_token_ids for f in firsts] == [[0], [1], [0]]
        for s in streams:
            await s.aclose()
        assert client.inflight == [0, 0] and client.rank_of("r0") is None
        assert [x.num_reqs for x in await client.get_loads()] == [0, 1]
        assert (await client.get_load()).max_total_tokens == 20
        flushed = await client.flush_cache()
        assert not flushed.ok and "dp rank 1: busy" in flushed.message

    asyncio.run(main())


def test_a_failed_replica_fails_the_start_and_stops_the_others():
    config = EngineConfig(dp_size=2, engine_cpus=(0, 4096), max_total_tokens=1024, num_threads=1)
    with pytest.raises(RuntimeError, match="--engine-cpus 4096: cannot pin the engine there"):
        asyncio.run(DataParallelClient.start(config))
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("pdserve-engine")]


# ---- a real server with two replicas ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dp_server(request: pytest.FixtureRequest):
    yield from serve_for_module(request, ["--dp-size", "2", "--num-threads", "1", "--max-total-tokens", "2048"])


def test_two_replicas_behind_one_server(dp_server):
    url = dp_server.base_url
    load = httpx.get(f"{url}/get_load").json()
    assert [(entry["dp_rank"], entry["max_total_tokens"]) for entry in load] == [(0, 2048), (1, 2048)]
    info = httpx.get(f"{url}/server_info").json()
    assert info["dp_size"] == 2 and info["tp_size"] == 1 and info["enable_dp_attention"] is False

    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    outputs = []
    for key, rank in (("routed_dp_rank", 0), ("routed_dp_rank", 1), ("data_parallel_rank", 1)):
        r = httpx.post(f"{url}/generate", json={**body, key: rank}, timeout=60)
        assert r.status_code == 200, r.text
        outputs.append(r.json()["output_ids"])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 8

    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "routed_dp_rank": 1}, timeout=60)
    assert r.status_code == 200, r.text

    for path, bad in (("/generate", {**body, "routed_dp_rank": 2}),
                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "routed_dp_rank": 5})):
        r = httpx.post(f"{url}{path}", json=bad, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "routed_dp_rank" in err["message"] and "dp_size 2" in err["message"] and err["code"] == 400

    # A running request shows in its own rank's load only.
    long = {"text": "Count:", "stream": True, "routed_dp_rank": 1,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}
    with httpx.stream("POST", f"{url}/generate", json=long, timeout=60) as r:
        lines = r.iter_lines()  # kept referenced: closing it would close the response
        assert r.status_code == 200 and next(lines).startswith("data:")
        during = httpx.get(f"{url}/get_load").json()
    assert [entry["num_reqs"] for entry in during] == [0, 1]

    assert httpx.post(f"{url}/flush_cache", timeout=60).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    lines = [x for x in metrics.splitlines() if x.startswith("sglang:max_total_num_tokens{")]
    assert sorted('dp_rank="0"' in x for x in lines) == [False, True]  # one series per replica, labelled
    assert sum(float(x.split()[-1]) for x in lines) == 4096
