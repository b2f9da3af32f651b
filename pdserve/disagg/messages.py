"""Typed messages between prefill and decode engines (ZMQ control plane) and the bootstrap server."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.disagg.transfer import AgentInfo


@dataclass(frozen=True)
class BootstrapInfo:
    """Per-request routing info the router injects (SGLang names)."""

    host: str | None
    port: int | None
    room: int


@dataclass(frozen=True)
class RankInfo:
    """What a prefill rank registers at its bootstrap server (PUT /route) and decodes look up (GET /route)."""

    engine_rank: int
    rank_ip: str
    rank_port: int  # the prefill engine's control (ZMQ PULL) port
    backend: str
    num_regions: int
    item_bytes: int
    server_id: str  # changes on every start: a restarted prefill is a new peer


@dataclass(frozen=True)
class PeerRegister:
    """decode -> prefill, once per peer: how to write into this decode's memory and where to report."""

    agent: AgentInfo
    ctrl_addr: str  # tcp://host:port of the decode's PULL socket


@dataclass(frozen=True)
class KVDestination:
    """decode -> prefill, per request: where the room's KV and metadata row go."""

    room: int
    decode_agent: str
    dst_slots: tuple[int, ...]
    meta_row: int
    prompt_len: int


@dataclass(frozen=True)
class TransferDone:
    """prefill -> decode: the room's KV and metadata row landed (ok) or the transfer failed/aborted."""

    room: int
    ok: bool
    error: str | None = None
    meta_bytes: bytes | None = None  # the metadata row, sent inline only by backends that move no data


@dataclass(frozen=True)
class AbortRoom:
    """Either direction: the other side gave up on this room."""

    room: int
    reason: str
