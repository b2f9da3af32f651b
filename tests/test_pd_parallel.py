"""PD across parallelism: prefill and decode with different TP sizes, page sizes, DP with room-following.

- Byte-exact: P prefill ranks (one process) write their KV heads into D decode ranks (another process) through
  the real backends (RankTransfer: kv_slicing's head slices), for TP mismatches incl. replicated KV heads.
- End to end: real prefill and decode servers with --tp / --page-size / --dp give the unified engine's greedy
  output; mismatched page sizes fail with a clear error; the bootstrap server answers SGLang's layout query.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from types import SimpleNamespace

import httpx
import msgspec
import pytest
import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.engine import Engine
from pdserve.model.loader import resolve_model
from pdserve.sampling_params import SamplingParams
from tests.conftest import stop_server
from tests.engine_helpers import build_tiny_model
from tests.pd_helpers import load, pd_post, start_decode, start_prefill
from tests.test_transfer_backends import _backend_missing

NUM_LAYERS, NUM_SLOTS, HEAD_DIM = 2, 48, 16
STAGE_SLOTS = 16
SRC_SLOTS = [0, 1, 2, 3, 9, 17, 18, 19, 20, 40, 5, 47]
DST_SLOTS = [10, 11, 12, 13, 4, 30, 31, 32, 33, 46, 1, 2]


def _global_kv(num_kv_heads: int) -> list[torch.Tensor]:
    """Per layer K then V: [slots, H, head_dim] of distinct values (the prefill's whole KV)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn((NUM_SLOTS, num_kv_heads, HEAD_DIM), generator=g) for _ in range(2 * NUM_LAYERS)]


def _rank_kv(num_kv_heads: int, tp: int, rank: int, fill: bool) -> SimpleNamespace:
    from pdserve.model.tp_layout import kv_heads_of_rank

    heads = kv_heads_of_rank(num_kv_heads, tp, rank)
    full = _global_kv(num_kv_heads)
    stage = torch.zeros(STAGE_SLOTS, len(heads), HEAD_DIM)  # free slots past the KV (a prefill lends them)
    pools = [torch.cat([t[:, heads.start:heads.stop] if fill else torch.zeros_like(t[:, heads.start:heads.stop]), stage])
             for t in full]
    return SimpleNamespace(k=pools[0::2], v=pools[1::2])


def _side(conn, role: str, backend: str, num_kv_heads: int, tp: int, staged: bool, peer_tp: int) -> None:
    """One server's TP ranks in one process: prefill ranks write, decode ranks hold and report their pools."""
    try:
        from pdserve.disagg.rank_transfer import DecodeLayout, RankTransfer
        from pdserve.disagg.transfer import AgentInfo, TransferState
        from pdserve.model.tp_layout import num_local_kv_heads

        config = EngineConfig(disaggregation_mode=role, transfer_backend=backend, tp_size=tp)
        kvs = [_rank_kv(num_kv_heads, tp, r, fill=role == "prefill") for r in range(tp)]
        ranks = [RankTransfer(config, r, kvs[r], num_kv_heads) for r in range(tp)]
        src_heads = num_local_kv_heads(num_kv_heads, peer_tp)
        dst_staged = staged and src_heads < num_local_kv_heads(num_kv_heads, tp)  # prefill TP > decode TP
        if role == "decode":
            conn.send([msgspec.msgpack.encode(x.local_info()) for x in ranks])
            conn.recv()  # the prefill finished
            for x in ranks if dst_staged else []:
                x.unstage(DST_SLOTS, NUM_SLOTS, src_heads)
            conn.send([[t[:NUM_SLOTS].clone() for t in kv.k + kv.v] for kv in kvs])  # K0 K1 V0 V1 per rank
        else:
            agents = tuple(msgspec.msgpack.decode(b, type=AgentInfo) for b in conn.recv())
            layout = DecodeLayout("decode-0", agents, num_kv_heads, HEAD_DIM * 4)
            for x in ranks:
                x.add_peer(layout)
                stage = NUM_SLOTS if staged and x.needs_staging(layout) else None  # prefill TP < decode TP
                dst_stage = NUM_SLOTS if staged and not x.needs_staging(layout) else None
                x.start(1, "decode-0", SRC_SLOTS, DST_SLOTS, stage_start=stage, dst_stage_start=dst_stage)
            deadline = time.monotonic() + 30
            while any(x.state(1)[0] is TransferState.TRANSFERRING for x in ranks) and time.monotonic() < deadline:
                time.sleep(0.002)
            conn.send([x.state(1)[0].name for x in ranks])
        conn.recv()
        for x in ranks:
            x.close()
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


@pytest.mark.parametrize("backend,num_kv_heads,prefill_tp,decode_tp,staged", [
    ("nixl", 4, 1, 2, False), ("nixl", 4, 1, 2, True), ("nixl", 4, 2, 1, False), ("nixl", 4, 2, 1, True),
    ("nixl", 4, 2, 4, True), ("nixl", 2, 4, 1, False), ("nixl", 2, 4, 1, True), ("nixl", 4, 1, 8, True),
    ("nixl", 3, 1, 3, True), ("nixl", 3, 3, 1, True), ("nixl", 4, 8, 2, True),
    ("mooncake", 4, 1, 2, True), ("mooncake", 4, 4, 2, False), ("mooncake", 4, 4, 2, True), ("mooncake", 3, 3, 1, False),
])
def test_head_slices_land_byte_exact_over_real_backends(backend, num_kv_heads, prefill_tp, decode_tp, staged):
    """staged: prefill TP < decode TP sends each decode rank's heads as one range from a staged copy on the prefill;
    prefill TP > decode TP writes whole slots into slots the decode lent, regrouped there (unstage)."""
    missing = _backend_missing(backend)
    if missing:
        pytest.skip(missing)
    ctx = mp.get_context("spawn")
    ends = {}
    procs = []
    for role, tp, peer_tp in (("decode", decode_tp, prefill_tp), ("prefill", prefill_tp, decode_tp)):
        mine, theirs = ctx.Pipe()
        procs.append(ctx.Process(target=_side, args=(theirs, role, backend, num_kv_heads, tp, staged, peer_tp),
                                 daemon=True))
        procs[-1].start()
        ends[role] = mine
    try:
        agents = ends["decode"].recv()
        assert not (isinstance(agents, tuple) and agents[0] == "error"), agents
        ends["prefill"].send(agents)
        states = ends["prefill"].recv()
        assert states == ["SUCCESS"] * prefill_tp, states
        ends["decode"].send("done")
        got = ends["decode"].recv()
        assert not (isinstance(got, tuple) and got[0] == "error"), got
        full = _global_kv(num_kv_heads)
        k_then_v = full[0::2] + full[1::2]
        from pdserve.model.tp_layout import kv_heads_of_rank

        for d in range(decode_tp):
            heads = kv_heads_of_rank(num_kv_heads, decode_tp, d)
            for region, pool in enumerate(got[d]):
                expected = torch.zeros_like(pool)
                expected[DST_SLOTS] = k_then_v[region][SRC_SLOTS][:, heads.start:heads.stop]
                assert torch.equal(pool.view(torch.int32), expected.view(torch.int32)), (d, region)
    finally:
        for end in ends.values():
            try:
                end.send("exit")
            except OSError:
                pass
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


def test_write_states_agree_across_ranks():
    """A write is as far as its slowest rank: one rank's failure fails the room on every rank (MIN of codes), but
    only once no rank's write is still in flight (it could still read or write KV that is about to be reused)."""
    from pdserve.disagg.rank_transfer import agree
    from pdserve.disagg.transfer import TransferState as S

    mine = [(S.SUCCESS, False), (S.SUCCESS, False), (S.SUCCESS, False), (S.FAILED, False), (S.FAILED, False)]
    other_rank = [(S.SUCCESS, False), (S.FAILED, False), (S.TRANSFERRING, True), (S.TRANSFERRING, True),
                  (S.FAILED, True)]
    theirs = torch.tensor([c for c in [{S.FAILED: 0, S.TRANSFERRING: 1, S.SUCCESS: 2}[st] for st, _ in other_rank]]
                          + [-int(busy) for _, busy in other_rank])

    def all_reduce_min(codes: torch.Tensor) -> None:  # two ranks: this one and other_rank
        codes.copy_(torch.minimum(codes, theirs))

    assert agree(mine, all_reduce_min) == [(S.SUCCESS, False), (S.FAILED, True), (S.TRANSFERRING, False),
                                           (S.TRANSFERRING, True), (S.TRANSFERRING, True)]
    assert agree([(S.FAILED, False)]) == [(S.FAILED, True)] and agree([], all_reduce_min) == []


def test_a_paged_destination_names_pages():
    from pdserve.disagg.messages import KVDestination

    dest = KVDestination(1, "decode-0", (), 0, 5, 7, None, 4, (3, 9))
    assert dest.slots() == (12, 13, 14, 15, 36)
    assert KVDestination(1, "decode-0", (5, 6), 0, 2, 7).slots() == (5, 6)


# ---- end to end ------------------------------------------------------------------------------------------
GREEDY = {"max_new_tokens": 8, "temperature": 0}
PROMPT_IDS = [[1, 422, 3011, 314, 2254, 28], [504, 2988, 314, 42, 216, 34, 32, 33, 11, 198, 7042, 30] * 3]


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny8")), "llama", num_heads=8, num_kv_heads=4)


def _unified(path: str) -> list[list[int]]:
    engine = Engine(EngineConfig(model=ModelConfig(model_path=path), max_total_tokens=1024, num_threads=1))
    try:
        return [o.new_token_ids for o in engine.generate(PROMPT_IDS, SamplingParams(**GREEDY))]
    finally:
        engine.close()


def _pd_outputs(path: str, backend: str, prefill_args: list[str], decode_args: list[str],
                rooms: list[int] | None = None, extra: dict | None = None) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs of the prompts through a prefill and a decode, and how many transfers each side staged
    (+ the prefill's chunk writes streamed ahead of the last chunk, last). extra: more body fields (the same on both
    legs, as a router sends them)."""
    common = ["--model-path", path, "--max-total-tokens", "2048"]
    prefill = start_prefill(backend, common + prefill_args)
    decode = None
    try:
        decode = start_decode(backend, common + decode_args)
        outs = []
        for i, ids in enumerate(PROMPT_IDS * (2 if rooms else 1)):
            room = rooms[i] if rooms else None
            body = {"input_ids": ids, "sampling_params": GREEDY, **(extra or {})}
            rp, rd = pd_post(prefill, decode, "/generate", body, room)
            assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
            outs.append(rd.json()["output_ids"])
        prefill_load = load(prefill.server)
        staged = [prefill_load.get("kv_transfers_staged"), load(decode).get("kv_transfers_staged"),
                  prefill_load.get("kv_chunks_streamed")]
        return outs, staged
    finally:
        stop_server(prefill.server)
        if decode is not None:
            stop_server(decode)


@pytest.mark.parametrize("backend,prefill_tp,decode_tp,page_size,chunk", [
    ("nixl", 1, 2, 1, 8), ("nixl", 2, 1, 16, 0), ("mooncake", 2, 2, 16, 8), ("mooncake", 1, 2, 16, 0),
    ("nixl", 4, 2, 1, 0), ("nixl", 2, 2, 1, 8),
])
def test_pd_across_tp_sizes_gives_unified_greedy_output(tiny8, backend, prefill_tp, decode_tp, page_size, chunk):
    """chunk: the prefill's --chunked-prefill-size (0: default): small chunks stream the KV chunk by chunk (not
    when the transfer is staged: then the prompt goes whole)."""
    if _backend_missing(backend):
        pytest.skip(_backend_missing(backend))
    page = ["--page-size", str(page_size)]
    chunked = ["--chunked-prefill-size", str(chunk)] if chunk else []
    outs, staged = _pd_outputs(tiny8, backend, ["--tp", str(prefill_tp), *page, *chunked],
                               ["--tp", str(decode_tp), *page])
    assert outs == _unified(tiny8)
    # Mismatched TP moves each decode rank's heads as ranges: staged by the smaller-TP side's peer
    n = len(PROMPT_IDS)
    assert staged[:2] == [n if prefill_tp < decode_tp else 0, n if prefill_tp > decode_tp else 0]
    streams = chunk and prefill_tp >= decode_tp  # a prefill that stages (P < D) sends each prompt whole
    # The 36-token prompt in chunks of 8: 4 chunk writes ahead of its last chunk (the 6-token one: none).
    assert staged[2] == (4 if streams else 0), staged


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 3), (3, 1)])
def test_smollm2_pd_1_to_3_and_3_to_1(prefill_tp, decode_tp):
    path = resolve_model(None).hf_dir
    outs, _ = _pd_outputs(path, "nixl", ["--tp", str(prefill_tp)], ["--tp", str(decode_tp), "--page-size", "1"])
    assert outs == _unified(path)


def test_dp_2_on_both_sides_follows_the_room(tiny8):
    """A room goes to prefill dp rank room % 2 (the prefill's front) and the decode looks it up there: requests
    of both parities meet their KV (a wrong guess would time out)."""
    outs, _ = _pd_outputs(tiny8, "nixl", ["--dp", "2"], ["--dp", "2"], rooms=[10, 11, 12, 13])
    assert outs == _unified(tiny8) * 2


def test_dp_ranks_named_by_the_router_override_the_room(tiny8):
    """SMG names the prefill's dp rank (routed_dp_rank on the prefill, disagg_prefill_dp_rank on the decode): it
    wins over room % dp_size on both sides (rooms 10 and 12 are even, dp rank 1 is odd)."""
    outs, _ = _pd_outputs(tiny8, "nixl", ["--dp", "2"], ["--dp", "2"], rooms=[10, 12, 14, 16],
                          extra={"routed_dp_rank": 1, "disagg_prefill_dp_rank": 1})
    assert outs == _unified(tiny8) * 2


def test_page_size_mismatch_fails_with_a_clear_error(tiny8):
    common = ["--model-path", tiny8, "--max-total-tokens", "2048"]
    prefill = start_prefill("nixl", common + ["--page-size", "16", "--tp", "2"],
                            env={"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "15"})
    decode = None
    try:
        boot = f"http://127.0.0.1:{prefill.bootstrap_port}/route"
        layout = httpx.get(boot, params={"prefill_dp_rank": -1, "target_tp_rank": -1, "target_pp_rank": -1},
                           timeout=10).json()
        assert layout["attn_tp_size"] == 2 and layout["page_size"] == 16 and layout["kv_cache_dtype"] == "float32"
        rank1 = httpx.get(boot, params={"prefill_dp_rank": 0, "target_tp_rank": 1, "target_pp_rank": 0},
                          timeout=10).json()
        assert rank1["attn_tp_rank"] == 1 and rank1["num_kv_heads"] == 4
        decode = start_decode("nixl", common + ["--page-size", "1"])
        _, rd = pd_post(prefill, decode, "/generate", {"input_ids": PROMPT_IDS[0], "sampling_params": GREEDY},
                        timeout=120)
        assert rd.status_code >= 400 or "error" in rd.text, rd.text
        assert "page size" in rd.text and "--page-size 16" in rd.text, rd.text
    finally:
        stop_server(prefill.server)
        if decode is not None:
            stop_server(decode)
