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
    prefill_dp_rank: int | None = None  # SMG's disagg_prefill_dp_rank (a decode: where the prefill has the room)
    # A prefill: vLLM's prefill-first protocol (kv_transfer_params.do_remote_decode): compute and answer at once,
    # then hold the KV under a lease until the decode's destination for the room arrives.
    hold_kv: bool = False


Size = Annotated[int, msgspec.Meta(ge=1, le=4096)]
Name = Annotated[str, msgspec.Meta(max_length=255)]


class RankInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What each prefill TP rank registers at its instance's bootstrap server (PUT /route, SGLang's field names
    plus the KV layout a decode checks) and decodes look up (GET /route)."""

    attn_tp_size: Size
    attn_tp_rank: NonNegative
    rank_ip: Name
    rank_port: Port  # the control (ZMQ PULL) port of the rank's engine (TP rank 0 of its dp group)
    page_size: Size
    kv_cache_dtype: Annotated[str, msgspec.Meta(max_length=32)]  # e.g. "float32"
    backend: Annotated[str, msgspec.Meta(max_length=32)]
    agent_name: Name  # this rank's transfer agent
    num_regions: NonNegative  # KV regions (2 per layer)
    num_kv_heads: Size  # the model's total (never local * tp: replicated heads)
    head_bytes: NonNegative  # one KV head of one token
    item_bytes: NonNegative  # one token slot of this rank (its local heads)
    server_id: Name  # changes on every start: a restart is a new peer
    attn_dp_size: Size = 1
    attn_dp_rank: NonNegative = 0
    pp_size: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1  # no pipeline parallelism
    pp_rank: Annotated[int, msgspec.Meta(ge=0, le=0)] = 0


class PrefillLayout(msgspec.Struct, frozen=True):
    """GET /route?...=-1: a prefill instance's parallel layout (503 until every rank registered)."""

    attn_tp_size: int
    attn_dp_size: int
    pp_size: int
    page_size: int
    kv_cache_dtype: str
    follow_bootstrap_room: bool = True  # a room goes to dp rank room % attn_dp_size


class PeerRegister(WireMessage, frozen=True):
    """decode -> prefill, once per peer: how to write into this decode's memory and where to report."""

    agent: AgentInfo  # decode TP rank 0's (it holds the metadata rows)
    ctrl_addr: Annotated[str, msgspec.Meta(max_length=300)]  # tcp://host:port of the decode's PULL socket
    rank_agents: tuple[AgentInfo, ...] = ()  # every decode TP rank's, rank order (() : just `agent`)
    num_kv_heads: NonNegative = 0  # the model's total KV heads (0: not given)
    head_bytes: NonNegative = 0
    page_size: Size = 1


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
    # Prefill TP > decode TP: the first of prompt_len contiguous slots lent in every decode rank's pool, where
    # each prefill rank writes its whole slots (grouped by head offset); the decode regroups them on arrival.
    stage_start: NonNegative | None = None
    # A paged pool (--page-size > 1) sends the prompt's pages instead of its slots (dst_slots empty).
    page_size: Size = 1
    dst_pages: tuple[NonNegative, ...] = ()

    def slots(self) -> tuple[int, ...]:
        """The destination slot of every prompt token; () when the pages do not cover exactly the prompt (the
        prefill then refuses the destination: its length differs from prompt_len)."""
        if not self.dst_pages:
            return self.dst_slots
        size = self.page_size
        if len(self.dst_pages) != -(-self.prompt_len // size):
            return ()
        return tuple(page * size + i for page in self.dst_pages for i in range(size))[: self.prompt_len]


class TransferDone(WireMessage, frozen=True):
    """prefill -> decode: the room's KV and metadata row landed (ok) or the transfer failed/aborted."""

    room: Room
    ok: bool
    nonce: NonNegative = 0  # the destination's (0: the prefill never had one for this room)
    error: Text | None = None
    meta_bytes: bytes | None = None  # the metadata row, sent inline only by backends that move no data
    transfer_ms: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0  # ok: how long the prefill's KV write took
    client_abort: bool = False  # not ok because a client aborted (not a PD failure: /metrics does not count it)
    kv_checksum: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)] | None = None  # CRC-32 (--disaggregation-kv-checksum)


class AbortRoom(WireMessage, frozen=True):
    """decode -> prefill: the decode gave up on this room. The prefill answers TransferDone(ok=False) with the
    nonce once it will not write into that destination, so the decode can release it (until then the decode
    keeps the destination quarantined)."""

    room: Room
    reason: Text
    nonce: NonNegative = 0
    decode_agent: Annotated[str, msgspec.Meta(max_length=255)] = ""


PD_MESSAGES = Union[PeerRegister, KVDestination, TransferDone, AbortRoom]  # what a PD control socket accepts
