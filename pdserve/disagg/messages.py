"""Typed messages between prefill and decode engines (ZMQ control plane, framed by wire.py) and the bootstrap
server (JSON). Every field that crosses a socket is typed and range-checked by the decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Union

import msgspec

from pdserve.disagg.transfer import AgentInfo
from pdserve.disagg.wire import WireMessage

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Room = Annotated[int, msgspec.Meta(ge=0)]  # an int64 (msgpack and msgspec bound it)
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Text = str  # bounded by the frame cap (wire.py): a sender never has its error text refused


@dataclass(frozen=True)
class BootstrapInfo:
    """Per-request routing info the router injects (SGLang names)."""

    host: str | None
    port: int | None
    room: int


class RankInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a prefill rank registers at its bootstrap server (PUT /route) and decodes look up (GET /route)."""

    engine_rank: NonNegative
    rank_ip: Annotated[str, msgspec.Meta(max_length=255)]
    rank_port: Port  # the prefill engine's control (ZMQ PULL) port
    backend: Annotated[str, msgspec.Meta(max_length=32)]
    num_regions: NonNegative
    item_bytes: NonNegative
    server_id: Annotated[str, msgspec.Meta(max_length=255)]  # changes on every start: a restart is a new peer
    kv_dtype: Annotated[str, msgspec.Meta(max_length=32)]  # e.g. "float32"


class PeerRegister(WireMessage, frozen=True):
    """decode -> prefill, once per peer: how to write into this decode's memory and where to report."""

    agent: AgentInfo
    ctrl_addr: Annotated[str, msgspec.Meta(max_length=300)]  # tcp://host:port of the decode's PULL socket


class KVDestination(WireMessage, frozen=True):
    """decode -> prefill, per request: where the room's KV and metadata row go. `nonce` is fresh for every
    destination the decode hands out: the prefill echoes it in the metadata row and in TransferDone, so nothing
    meant for an earlier use of a room (or of these slots) is ever taken for this one."""

    room: Room
    decode_agent: Annotated[str, msgspec.Meta(max_length=255)]
    dst_slots: tuple[NonNegative, ...]
    meta_row: NonNegative
    prompt_len: NonNegative
    nonce: NonNegative


class TransferDone(WireMessage, frozen=True):
    """prefill -> decode: the room's KV and metadata row landed (ok) or the transfer failed/aborted."""

    room: Room
    ok: bool
    nonce: NonNegative = 0  # the destination's (0: the prefill never had one for this room)
    error: Text | None = None
    meta_bytes: bytes | None = None  # the metadata row, sent inline only by backends that move no data


class AbortRoom(WireMessage, frozen=True):
    """decode -> prefill: the decode gave up on this room. The prefill answers TransferDone(ok=False) with the
    nonce once it will not write into that destination, so the decode can release it (until then the decode
    keeps the destination quarantined)."""

    room: Room
    reason: Text
    nonce: NonNegative = 0
    decode_agent: Annotated[str, msgspec.Meta(max_length=255)] = ""


PD_MESSAGES = Union[PeerRegister, KVDestination, TransferDone, AbortRoom]  # what a PD control socket accepts
