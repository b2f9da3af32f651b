"""PD engines in one process (a tiny model, the real NIXL backend): the order in which the decode side emits."""

from __future__ import annotations

import time

from pdserve.config import EngineConfig, ModelConfig
from pdserve.disagg.decode import DecodeEngine
from pdserve.disagg.messages import BootstrapInfo
from pdserve.disagg.prefill import PrefillEngine
from pdserve.engine.messages import GenerateRequest, RequestOutput
from pdserve.sampling_params import SamplingParams
from tests.conftest import free_port
from tests.engine_helpers import build_tiny_model


def _first_output(prefill: PrefillEngine, decode: DecodeEngine, rid: str, timeout: float = 60) -> RequestOutput:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prefill.step()
        for out in decode.step():
            assert out.error is None, out.error
            if out.rid == rid and out.new_token_ids:
                return out
        time.sleep(0.001)
    raise AssertionError("the decode side never emitted the first token")


def test_decode_emits_the_first_token_before_running_a_decode_step(tmp_path):
    model = build_tiny_model(str(tmp_path / "tiny"))
    common = dict(model=ModelConfig(model_path=model), max_total_tokens=1024, transfer_backend="nixl", num_threads=1)
    bootstrap_port = free_port()
    prefill = PrefillEngine(EngineConfig(**common, disaggregation_mode="prefill", bootstrap_port=bootstrap_port))
    decode = DecodeEngine(EngineConfig(**common, disaggregation_mode="decode"))
    try:
        g = GenerateRequest("r1", tuple(range(100, 140)), SamplingParams(max_new_tokens=4, temperature=0.0),
                            bootstrap=BootstrapInfo("127.0.0.1", bootstrap_port, 7))
        prefill.add_request(g)
        decode.add_request(g)
        first = _first_output(prefill, decode, "r1")
        # The step that took in the KV returned the prefill's token at once: no decode step ran behind it
        # (a client would otherwise get its first token one decode step late, glued to the second).
        assert first.new_token_ids == decode.engine.requests["r1"].output_ids and len(first.new_token_ids) == 1
        tokens = list(first.new_token_ids)
        deadline = time.monotonic() + 60
        while len(tokens) < 4:
            assert time.monotonic() < deadline, f"decoding stalled after {tokens}"
            outs = [o for o in decode.step() if o.rid == "r1"]
            assert all(len(o.new_token_ids) == 1 for o in outs)  # then one token per decode step
            tokens += [t for o in outs for t in o.new_token_ids]
        assert outs[-1].finish_reason == "length" and decode.engine.scheduler.kv.allocator.num_free == 1024
    finally:
        decode.close()
        prefill.close()
