"""The control plane between servers takes only typed, signed frames (disagg/wire.py): no pickle, no forged or
replayed message, and bootstrap writes need the deployment's token. Unit checks of the codec, then a real
prefill server attacked through its public control port."""

from __future__ import annotations

import os
import re
import time

import httpx
import msgspec
import pytest

from pdserve.config import EngineConfig
from pdserve.disagg.messages import PD_MESSAGES, AbortRoom, KVDestination, PeerRegister, RankInfo, TransferDone
from pdserve.disagg.transfer import AgentInfo, MemRegion
from pdserve.disagg.wire import WIRE_VERSION, FrameCodec
from pdserve.epd.messages import EPD_MESSAGES, EmbedAbort, EmbedDestination, EmbedDone
from pdserve.sampling_params import SamplingParams
from tests.pd_helpers import AUTH_TOKEN, pickle_bomb, send_raw_frames, start_decode, start_prefill, stop_all

SECRET = AUTH_TOKEN.encode()
AGENT = AgentInfo("nixl", "decode-abc", b"\x00meta\xff", (MemRegion(4096, 1 << 20, 512), MemRegion(8192, 64, 64)))
PD = [PeerRegister(AGENT, "tcp://127.0.0.1:5555"), KVDestination(7, "decode-abc", (3, 4, 9), 2, 3, 99),
      TransferDone(7, ok=True, nonce=99, meta_bytes=b"row"), TransferDone(8, ok=False, error="x" * 10_000),
      AbortRoom(2**63 - 1, "client went away", 5, "decode-abc")]
EPD = [EmbedDestination(1, 0, AGENT, "tcp://127.0.0.1:1", 128, 4, 64, "float32"),
       EmbedDone(1, 0, ok=True, data=b"\x01" * 1024, nbytes=1024, transfer_s=0.5), EmbedAbort(1, "done")]


@pytest.mark.parametrize("secret", [SECRET, None], ids=["signed", "unsigned"])
def test_every_message_round_trips(secret):
    for union, messages in ((PD_MESSAGES, PD), (EPD_MESSAGES, EPD)):
        sender, receiver = FrameCodec(union, secret), FrameCodec(union, secret)
        for msg in messages:
            assert receiver.decode(sender.encode(msg)) == msg
        assert not receiver.dropped


def test_bad_frames_are_dropped_and_counted(tmp_path):
    rx, tx = FrameCodec(PD_MESSAGES, SECRET), FrameCodec(PD_MESSAGES, SECRET)
    marker = str(tmp_path / "pwned")
    frame = tx.encode(PD[1])
    cases = {
        "parts": [pickle_bomb(marker)],
        "signature": [pickle_bomb(marker), b"\x00" * 32],
    }
    for reason, parts in cases.items():
        assert rx.decode(parts) is None and rx.dropped[reason] == 1
    assert rx.decode(FrameCodec(PD_MESSAGES, b"another-secret-0123").encode(PD[1])) is None  # forged
    assert rx.decode(FrameCodec(PD_MESSAGES, None).encode(PD[1])) is None  # unsigned
    assert rx.dropped["signature"] == 3
    assert rx.decode(frame) == PD[1]
    assert rx.decode(frame) is None and rx.dropped["replay"] == 1  # the same frame again
    assert not os.path.exists(marker)

    def signed(payload: bytes) -> list[bytes]:
        import hashlib
        import hmac

        return [payload, hmac.new(SECRET, payload, hashlib.sha256).digest()]

    body = msgspec.msgpack.encode(PD[1])
    stale = msgspec.msgpack.encode([WIRE_VERSION, time.time() - 3600, os.urandom(16), PD[1]])
    assert rx.decode(signed(stale)) is None and rx.dropped["replay"] == 2
    future = msgspec.msgpack.encode([WIRE_VERSION + 1, time.time(), os.urandom(16), PD[1]])
    assert rx.decode(signed(future)) is None and rx.dropped["version"] == 1
    negative = msgspec.msgpack.encode([WIRE_VERSION, time.time(), os.urandom(16),
                                       {"type": "KVDestination", "room": -1, "decode_agent": "d", "dst_slots": [1],
                                        "meta_row": 0, "prompt_len": 1, "nonce": 1}])
    unknown = msgspec.msgpack.encode([WIRE_VERSION, time.time(), os.urandom(16), {"type": "Shutdown"}])
    for payload in (negative, unknown, body, pickle_bomb(marker)):
        assert rx.decode(signed(payload)) is None
    assert rx.dropped["malformed"] == 4
    small = FrameCodec(PD_MESSAGES, SECRET, max_frame_bytes=256)
    assert small.decode(tx.encode(PD[3])) is None and small.dropped["size"] == 1
    assert not os.path.exists(marker)


def test_config_fails_closed_off_loopback():
    with pytest.raises(ValueError, match="auth-token"):
        EngineConfig(disaggregation_mode="prefill", host="10.1.2.3")
    with pytest.raises(ValueError, match="characters"):
        EngineConfig(disaggregation_mode="decode", auth_token="short")
    assert EngineConfig(disaggregation_mode="prefill", host="10.1.2.3", auth_token=AUTH_TOKEN).auth_secret == SECRET
    assert EngineConfig(host="0.0.0.0").auth_token is None  # no control plane: nothing to sign
    assert EngineConfig().transfer_backend == "nixl"  # the default moves real KV


@pytest.mark.parametrize("field,value", [("seed", 1e308), ("seed", 2**64), ("max_new_tokens", 1e30),
                                         ("top_k", 2**40), ("temperature", float("nan")),
                                         ("temperature", float("inf"))])
def test_numbers_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})


def test_seed_out_of_range_is_a_400(server):
    for body in ({"prompt": "Hi", "seed": 1e308}, {"prompt": "Hi", "seed": 2**64}, {"prompt": "Hi", "n": 1e300}):
        r = httpx.post(server.base_url + "/v1/completions", json={"model": "any", "max_tokens": 2, **body},
                       headers=server.headers, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_prefill_control_port_runs_no_pickle_and_takes_no_forged_frame(tmp_path):
    prefill = start_prefill("fake")
    decode = start_decode("fake")
    marker = str(tmp_path / "pwned")
    try:
        # The decode's control address is in its log ("control tcp://..."); the prefill's is public below.
        decode_addr = re.search(r"control (tcp://[0-9.]+:[0-9]+)", decode.log()).group(1)
        send_raw_frames(decode_addr, [[pickle_bomb(marker)], [pickle_bomb(marker), b""]])
        boot = f"http://127.0.0.1:{prefill.bootstrap_port}"
        rank = httpx.get(boot + "/route", params={"engine_rank": 0}, timeout=10).json()  # reads stay open
        forged = FrameCodec(PD_MESSAGES, b"not-the-deployment-secret").encode(PD[0])
        send_raw_frames(f"tcp://127.0.0.1:{rank['rank_port']}", [
            [pickle_bomb(marker)], [pickle_bomb(marker), b""], forged, FrameCodec(PD_MESSAGES, None).encode(PD[4]),
            [b"\xc1" * 64, b"x"]])
        deadline = time.monotonic() + 30
        while ((prefill.server.log().count("control frame dropped") < 5
                or decode.log().count("control frame dropped") < 2) and time.monotonic() < deadline):
            time.sleep(0.2)
        log = prefill.server.log()
        assert log.count("control frame dropped") == 5, log[-3000:]
        assert "control frame dropped (signature)" in log and "control frame dropped (parts)" in log
        assert not os.path.exists(marker)
        assert decode.log().count("control frame dropped") == 2
        for server, n in ((prefill.server, 5), (decode, 2)):  # /get_load counts them for operators
            assert httpx.get(server.base_url + "/get_load", timeout=10).json()[0]["control_frames_dropped"] == n
        assert prefill.server.proc.poll() is None and decode.proc.poll() is None
        assert httpx.get(prefill.server.base_url + "/health", timeout=10).status_code == 200

        info = msgspec.json.encode(msgspec.convert({**rank, "rank_ip": "10.66.66.66"}, RankInfo))
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": AUTH_TOKEN}):
            r = httpx.put(boot + "/route", content=info, headers=headers, timeout=10)
            assert r.status_code == 401, r.text
        assert httpx.get(boot + "/route", params={"engine_rank": 0}, timeout=10).json()["rank_ip"] == "127.0.0.1"
        assert httpx.get(boot + "/route", params={"prefill_dp_rank": -1, "target_tp_rank": -1},
                         timeout=10).json()["attn_tp_size"] == 1  # the layout (SGLang's -1 query)
        r = httpx.put(boot + "/route", content=b'{"attn_tp_rank": 0, "rank_ip": 5}',
                      headers={"Authorization": f"Bearer {AUTH_TOKEN}"}, timeout=10)
        assert r.status_code == 400
        r = httpx.put(boot + "/route", content=msgspec.json.encode(msgspec.convert(rank, RankInfo)),
                      headers={"Authorization": f"Bearer {AUTH_TOKEN}"}, timeout=10)
        assert r.status_code == 200
    finally:
        stop_all(prefill, decode)
