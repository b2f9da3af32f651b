"""Tensor parallelism: per-rank shards, greedy parity of TP 2/4/8 (tiny model with 8 query and 4 KV heads) and TP 3
(SmolLM2: 9 heads, 3 KV heads) with TP 1 and transformers, a `--tp 2` server, ranks on two "nodes" (processes on
this machine), and a rank killed mid-request."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import psutil
import pytest
import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.engine import Engine
from pdserve.model.llama import LlamaForCausalLM, ShardReader
from pdserve.model.loader import resolve_model
from pdserve.sampling_params import SamplingParams
from tests.conftest import free_port, spawn, start_server, stop_server
from tests.engine_helpers import PROMPTS, build_tiny_model, hf_greedy

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny8")), "llama", num_heads=8, num_kv_heads=4)


class OneRank:
    """Stands for a TP group when only the load-time shard is inspected (no collectives run)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_each_rank_holds_its_heads_and_vocab_rows(tiny8, tp):
    full = ShardReader(tiny8)
    embed = full.read("model.embed_tokens.weight")  # [V, H]
    vocab = embed.shape[0]
    per = -(-vocab // tp)
    for rank in range(tp):
        m = LlamaForCausalLM(tiny8, torch.float32, torch.device("cpu"), OneRank(rank, tp))
        assert m.arch.num_heads == 8 // tp and m.arch.intermediate_size == 128 // tp
        assert m.arch.num_kv_heads == max(1, 4 // tp)  # tp 8: each of the 4 KV heads on 2 ranks
        assert m.full_arch.num_kv_heads == 4 and m.full_arch.vocab_size == vocab
        rows = embed[rank * per : (rank + 1) * per]
        assert torch.equal(m.embed[: rows.shape[0]], rows) and not m.embed[rows.shape[0] :].any()


def test_a_model_that_cannot_be_cut_is_refused(tiny8):
    with pytest.raises(ValueError, match="cannot be split over tp=3"):
        LlamaForCausalLM(tiny8, torch.float32, torch.device("cpu"), OneRank(0, 3))


def _greedy(path: str, tp: int, prompts: list[str]) -> list[list[int]]:
    engine = Engine(EngineConfig(model=ModelConfig(model_path=path), max_total_tokens=1024, tp_size=tp,
                                 num_threads=1))
    try:
        return [o.new_token_ids for o in engine.generate(prompts, GREEDY)]
    finally:
        engine.close()


def _hf(path: str, prompts: list[str]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return [hf_greedy(model, tok, p, GREEDY.max_new_tokens)[0] for p in prompts]


def test_tp_2_4_8_greedy_equals_tp_1_and_transformers(tiny8):
    prompts = PROMPTS[:4]
    want = _hf(tiny8, prompts)
    assert _greedy(tiny8, 1, prompts) == want
    for tp in (2, 4, 8):  # 8: KV heads replicated on 2 ranks each
        assert _greedy(tiny8, tp, prompts) == want, f"tp {tp}"


def test_tp_2_prefill_in_layer_slices_equals_whole_steps(tiny8):
    """Every rank runs the same layer slices of a step and keeps its own hidden state between them."""
    def run(tp: int, **kw) -> list[list[int]]:
        engine = Engine(EngineConfig(model=ModelConfig(model_path=tiny8), max_total_tokens=1024, tp_size=tp,
                                     num_threads=1, chunked_prefill_size=64, disable_radix_cache=True, **kw))
        try:
            ids = engine.tokenizer.encode("The history of computing is long and full of surprises. " * 20)
            return [o.new_token_ids for o in engine.generate([ids[:150], ids[160:170]], GREEDY)]
        finally:
            engine.close()

    assert run(2, schedule_policy="spf", prefill_layer_slices=2) == run(1)


def test_smollm2_tp_3_greedy_equals_tp_1_and_transformers():
    path = resolve_model(None).hf_dir
    prompts = PROMPTS[:3]
    want = _hf(path, prompts)
    assert _greedy(path, 3, prompts) == want
    assert _greedy(path, 1, prompts) == want


def _generate(base_url: str, ids: list[int], max_new_tokens: int = 12) -> list[int]:
    r = httpx.post(base_url + "/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0}}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def test_server_with_tp_2_answers_and_reports_its_layout(tiny8):
    ids = [1, 422, 3011, 314, 2254, 28, 12, 54]
    want = _greedy(tiny8, 1, [ids])[0]
    server = start_server(["--model-path", tiny8, "--tp", "2", "--num-threads", "1", "--max-total-tokens", "1024"])
    try:
        info = httpx.get(server.base_url + "/server_info", timeout=10).json()
        assert info["tp_size"] == 2 and info["dp_size"] == 1
        assert _generate(server.base_url, ids) == want
    finally:
        stop_server(server)


def test_ranks_on_two_nodes_join_rank_0(tiny8):
    """--nnodes 2: node 1 runs rank 1 only (no HTTP) and joins rank 0 at --dist-init-addr."""
    ids = [1, 422, 3011, 314, 2254, 28, 12, 54]
    want = _greedy(tiny8, 1, [ids])[0]
    addr = f"127.0.0.1:{free_port()}"
    common = ["--model-path", tiny8, "--tp", "2", "--nnodes", "2", "--dist-init-addr", addr, "--num-threads", "1",
              "--max-total-tokens", "1024"]
    node1 = spawn("pdserve.launch_server", [*common, "--node-rank", "1"])
    server = None
    try:
        server = start_server([*common, "--node-rank", "0"])
        assert _generate(server.base_url, ids) == want
        assert "node 1: tensor-parallel ranks 1..1" in node1.log()
    finally:
        if server is not None:
            stop_server(server)
        deadline = time.monotonic() + 60
        while node1.proc.poll() is None and time.monotonic() < deadline:  # rank 0's shutdown reaches it
            time.sleep(0.2)
        exited = node1.proc.poll() is not None
        stop_server(node1)
    assert exited, "node 1 did not stop with rank 0"


def test_a_rank_killed_mid_request_fails_its_requests_and_stops_every_rank(tiny8):
    server = start_server(["--model-path", tiny8, "--tp", "2", "--num-threads", "1", "--max-total-tokens", "4096"])
    try:
        match = re.search(r"\[tp1 (\d+)\]", server.log())
        assert match, server.log()[-2000:]
        rank1 = psutil.Process(int(match.group(1)))
        tree = [server.proc.pid] + [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
        body = {"input_ids": [1, 2, 3, 4], "stream": True,
                "sampling_params": {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}}
        chunks = []
        with httpx.stream("POST", server.base_url + "/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                chunks.append(line)
                if len(chunks) == 6:  # streaming: the request is running on both ranks
                    os.kill(rank1.pid, signal.SIGKILL)
        text = "\n".join(chunks)
        assert "error" in text or "abort" in text, text[-2000:]
        assert server.proc.wait(timeout=120) != 0  # the engine stops: nothing of it is left serving
        deadline = time.monotonic() + 150  # COLLECTIVE_TIMEOUT_S bounds any rank still waiting
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree):
            assert time.monotonic() < deadline, [p for p in tree if psutil.pid_exists(p)]
            time.sleep(0.5)
    finally:
        stop_server(server)
