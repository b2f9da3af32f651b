"""PD engines in one process, driven step by step, with control frames injected through their real sockets:
out of order, late, duplicated, malformed and forged. Each case checks its outcome and that every KV slot and
metadata row is free afterwards on both sides. A tiny random model; the fake backend, and NIXL where bytes
must really land (a late write into a quarantined destination)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch
import zmq

from pdserve.config import EngineConfig, ModelConfig
from pdserve.disagg.decode import DecodeEngine
from pdserve.disagg.messages import (PD_MESSAGES, AbortRoom, BootstrapInfo, KVDestination, PeerRegister,
                                     TransferDone)
from pdserve.disagg.prefill import PrefillEngine
from pdserve.disagg.transfer import AgentInfo, MemRegion
from pdserve.disagg.wire import FrameCodec, WireMessage
from pdserve.engine.messages import GenerateRequest, RequestOutput
from pdserve.sampling_params import SamplingParams
from tests.conftest import free_port
from tests.engine_helpers import build_tiny_model

SECRET = "state-machine-secret-0123"
NUM_SLOTS = 1024
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


class PD:
    def __init__(self, model: str, backend: str):
        common = dict(model=ModelConfig(model_path=model), max_total_tokens=NUM_SLOTS, transfer_backend=backend,
                      num_threads=1, auth_token=SECRET)
        self.bootstrap_port = free_port()
        self.prefill = PrefillEngine(EngineConfig(**common, disaggregation_mode="prefill",
                                                  bootstrap_port=self.bootstrap_port))
        self.decode = DecodeEngine(EngineConfig(**common, disaggregation_mode="decode"))
        self.outs: dict[str, list[RequestOutput]] = {}  # the decode's, by rid
        self.prefill_outs: dict[str, list[RequestOutput]] = {}

    def submit(self, rid: str, prompt: tuple[int, ...], room: int, to_prefill: bool = True,
               to_decode: bool = True) -> GenerateRequest:
        g = GenerateRequest(rid, prompt, GREEDY, bootstrap=BootstrapInfo("127.0.0.1", self.bootstrap_port, room))
        if to_prefill:
            self.prefill.add_request(g)
        if to_decode:
            self.decode.add_request(g)
        return g

    def step(self) -> None:
        for out in self.prefill.step():
            self.prefill_outs.setdefault(out.rid, []).append(out)
        for out in self.decode.step():
            self.outs.setdefault(out.rid, []).append(out)

    def run_until(self, cond: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            self.step()
            time.sleep(0.001)

    def done(self, rid: str, outs: dict[str, list[RequestOutput]] | None = None) -> RequestOutput | None:
        """The terminal output of rid on the decode (or on the prefill: outs=self.prefill_outs)."""
        return next((o for o in (self.outs if outs is None else outs).get(rid, []) if o.finish_reason), None)

    def tokens(self, rid: str) -> list[int]:
        """What the decode streamed for rid (the first token, from the prefill, then its own)."""
        return [t for o in self.outs.get(rid, []) for t in o.new_token_ids]

    def inject(self, engine: PrefillEngine | DecodeEngine, msg: WireMessage | list[bytes],
               secret: str | None = SECRET) -> None:
        parts = msg if isinstance(msg, list) else FrameCodec(PD_MESSAGES, secret and secret.encode()).encode(msg)
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(engine.link.ctrl.addr)
        sock.send_multipart(parts)
        sock.close()
        time.sleep(0.1)

    def assert_all_free(self) -> None:
        """Once quiet: every slot and metadata row of both sides is free (the prefill's cache flushed)."""
        self.run_until(lambda: not self.decode.quarantine and not self.decode.rooms and not self.prefill.room_rid
                       and not self.prefill.transferring and not self.decode.engine.scheduler.running)
        assert self.prefill.flush_cache()
        for side in (self.prefill, self.decode):
            assert side.engine.scheduler.kv.allocator.num_free == NUM_SLOTS, type(side).__name__
            assert len(side.link.meta.free_rows) == side.link.meta.buf.shape[0], type(side).__name__

    def close(self) -> None:
        self.decode.close()
        self.prefill.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def fake_pd(model) -> Iterator[PD]:
    pd = PD(model, "fake")
    yield pd
    pd.close()


def test_duplicated_late_and_foreign_transfer_done_change_nothing(fake_pd):
    pd = fake_pd
    pd.submit("dup", tuple(range(100, 120)), room=11)
    pd.run_until(lambda: pd.decode.transferring.get(11) is not None)
    nonce = pd.decode.transferring[11].disagg.nonce
    pd.inject(pd.decode, TransferDone(11, ok=False, nonce=nonce ^ 1, error="forged failure"))  # wrong nonce
    pd.inject(pd.decode, TransferDone(11, ok=False, nonce=nonce, error="unsigned"), secret=None)  # unsigned
    pd.run_until(lambda: pd.done("dup"))
    assert pd.done("dup").error is None and len(pd.tokens("dup")) == GREEDY.max_new_tokens
    for _ in range(2):  # a duplicate of the real TransferDone, then a late one for a room long gone
        pd.inject(pd.decode, TransferDone(11, ok=True, nonce=nonce))
        pd.step()
    assert pd.decode.link.ctrl.dropped.get("signature") == 1
    pd.assert_all_free()


def test_destination_before_its_request_and_out_of_bounds_destinations(fake_pd):
    pd = fake_pd
    # The decode's destination arrives first (the usual race), then the prefill's request: it proceeds.
    pd.submit("early", tuple(range(200, 230)), room=21, to_prefill=False)
    pd.run_until(lambda: 21 in pd.prefill.destinations)
    pd.submit("early", tuple(range(200, 230)), room=21, to_decode=False)
    pd.run_until(lambda: pd.done("early"))
    assert pd.done("early").error is None and len(pd.tokens("early")) == GREEDY.max_new_tokens
    # A destination outside the decode's memory (a buggy or hostile decode): the room fails, nothing written.
    agent = pd.decode.link.agent_name
    pd.submit("oob", tuple(range(10, 14)), room=22, to_decode=False)
    pd.inject(pd.prefill, KVDestination(22, agent, (0, 1, 2, 10 ** 9), 0, 4, 5))
    pd.run_until(lambda: pd.done("oob", pd.prefill_outs))
    assert "outside the decode's registered memory" in pd.done("oob", pd.prefill_outs).error
    pd.assert_all_free()


def test_a_refused_peer_and_malformed_frames_fail_only_what_they_name(fake_pd):
    pd = fake_pd
    dropped = dict(pd.prefill.link.ctrl.dropped)
    bad_layout = AgentInfo("fake", "decode-wrong-model", b"", (MemRegion(4096, 4096, 64),) * 3)
    pd.inject(pd.prefill, PeerRegister(bad_layout, pd.decode.link.ctrl.addr))
    pd.inject(pd.prefill, [b"\x00" * 10])  # one part
    pd.inject(pd.prefill, [b"\x92\x01", b"junk"])  # bad signature
    pd.step()
    assert pd.prefill.peers["decode-wrong-model"].refused.startswith("decode decode-wrong-model has a different")
    pd.submit("refused", tuple(range(30, 40)), room=31, to_decode=False)
    pd.inject(pd.prefill, KVDestination(31, "decode-wrong-model", tuple(range(10)), 0, 10, 9))
    pd.run_until(lambda: pd.done("refused", pd.prefill_outs))
    assert "different KV layout" in pd.done("refused", pd.prefill_outs).error
    after = pd.prefill.link.ctrl.dropped
    assert [after.get(k, 0) - dropped.get(k, 0) for k in ("parts", "signature")] == [1, 1]
    pd.submit("after", tuple(range(300, 310)), room=32)  # the engines still serve
    pd.run_until(lambda: pd.done("after"))
    assert pd.done("after").error is None
    pd.assert_all_free()


def test_a_decode_abort_quarantines_the_destination_until_the_prefill_says_so(fake_pd):
    pd = fake_pd
    pd.submit("gone", tuple(range(400, 440)), room=41, to_prefill=False)
    pd.run_until(lambda: 41 in pd.decode.transferring)
    slots = set(pd.decode.transferring[41].slots)
    pd.decode.abort("gone", "client went away")
    assert {key[0] for key in pd.decode.quarantine} == {41}
    held = next(iter(pd.decode.quarantine.values()))
    assert set(held.slots) == slots and pd.decode.engine.scheduler.kv.allocator.num_free == NUM_SLOTS - len(slots)
    pd.run_until(lambda: not pd.decode.quarantine)  # the prefill's TransferDone(ok=False, nonce) released it
    pd.assert_all_free()


def test_a_late_write_lands_only_in_its_quarantined_destination(model):
    """NIXL: the decode gives up on room A after handing out its destination, and the prefill never hears
    the abort (dropped), so it computes A and writes its KV late, while request B decodes: A's KV lands in A's
    quarantined slots, B's output is exactly its output alone, and A's slots were never handed to B."""
    pd = PD(model, "nixl")
    try:
        prompt_b = tuple(range(500, 532))
        pd.submit("alone", prompt_b, room=50)
        pd.run_until(lambda: pd.done("alone"))
        alone = pd.tokens("alone")
        assert len(alone) == GREEDY.max_new_tokens
        pd.assert_all_free()

        prompt_a = tuple(range(600, 664))
        pd.submit("a", prompt_a, room=51, to_prefill=False)
        pd.run_until(lambda: 51 in pd.decode.transferring)
        sent = pd.decode.link.ctrl.send
        pd.decode.link.ctrl.send = lambda addr, msg: None if isinstance(msg, AbortRoom) else sent(addr, msg)
        pd.decode.abort("a", "waiting timeout (simulated)")
        pd.decode.link.ctrl.send = sent
        held = set(next(iter(pd.decode.quarantine.values())).slots)
        assert len(held) == len(prompt_a)
        k_pool = pd.decode.engine.runner.kv.k[0]
        before = k_pool[sorted(held)].clone()
        pd.submit("b", prompt_b, room=52)
        running = pd.decode.engine.scheduler.running
        pd.run_until(lambda: any(r.rid == "b" for r in running))  # B prefilled alone, as before, and decoding
        assert not held & set(next(r for r in running if r.rid == "b").slots)
        pd.submit("a", prompt_a, room=51, to_decode=False)  # the prefill computes A late and writes it
        pd.run_until(lambda: pd.done("b") and pd.done("a", pd.prefill_outs))
        assert pd.done("a", pd.prefill_outs).error is None  # the write itself succeeded, into quarantine
        assert not torch.equal(k_pool[sorted(held)], before)  # A's KV landed in A's quarantined slots
        assert pd.tokens("b") == alone
        pd.assert_all_free()  # A's TransferDone(ok, nonce) released the quarantine
    finally:
        pd.close()


def test_mismatched_backends_refuse_each_other_on_the_first_request(fake_pd, model):
    """A nixl decode against the fake prefill: its first request fails at once with the reason."""
    pd = fake_pd
    decode = DecodeEngine(EngineConfig(model=ModelConfig(model_path=model), max_total_tokens=NUM_SLOTS,
                                       transfer_backend="nixl", num_threads=1, auth_token=SECRET,
                                       disaggregation_mode="decode"))
    try:
        g = GenerateRequest("mismatch", tuple(range(10, 20)), GREEDY,
                            bootstrap=BootstrapInfo("127.0.0.1", pd.bootstrap_port, 61))
        decode.add_request(g)
        deadline = time.monotonic() + 30
        outs: list[RequestOutput] = []
        while not outs and time.monotonic() < deadline:
            outs = decode.step()
            time.sleep(0.01)
        assert outs and "--disaggregation-transfer-backend must match" in outs[0].error, outs
        assert decode.engine.scheduler.kv.allocator.num_free == NUM_SLOTS
    finally:
        decode.close()
