"""Transfer layer shared by every backend: the one transfer-state enum, memory regions, and the
TransferEngine interface that nixl, mooncake and fake implement.

A KV pool is a list of registered regions (per layer: K then V); slot i of a region lives at
ptr + i * item_bytes. Prefill and decode pools of the same model have the same region list, so a write
is a list of runs (region index, source offset, destination offset, bytes).
"""

from __future__ import annotations

import abc
import enum
import logging
from dataclasses import dataclass
from typing import Annotated

import msgspec

logger = logging.getLogger(__name__)


class TransferState(enum.Enum):
    """Polled by every prefill and decode queue. Abort is possible in every state (-> FAILED)."""

    FAILED = "failed"
    BOOTSTRAPPING = "bootstrapping"  # peer not known yet / destination not received
    WAITING_FOR_INPUT = "waiting_for_input"  # destination known, KV not computed yet (or not sent yet)
    KV_HELD = "kv_held"  # prefill first (vLLM's protocol): computed and answered, KV kept under a lease for the decode
    TRANSFERRING = "transferring"
    SUCCESS = "success"


class MemRegion(msgspec.Struct, frozen=True):
    ptr: Annotated[int, msgspec.Meta(ge=0)]
    nbytes: Annotated[int, msgspec.Meta(ge=0)]
    item_bytes: Annotated[int, msgspec.Meta(ge=0)]  # bytes of one slot (or one metadata row)


class AgentInfo(msgspec.Struct, frozen=True):
    """What a peer needs to write into this engine's memory. Crosses machines inside PeerRegister / EPD
    messages (wire.py frames)."""

    backend: Annotated[str, msgspec.Meta(max_length=32)]
    agent_name: Annotated[str, msgspec.Meta(max_length=255)]
    payload: Annotated[bytes, msgspec.Meta(max_length=256 * 1024)]  # nixl agent metadata, mooncake session, ...
    regions: Annotated[tuple[MemRegion, ...], msgspec.Meta(max_length=4096)]


@dataclass(frozen=True)
class WriteRun:
    region: int
    src_offset: int
    dst_offset: int
    nbytes: int


def slot_runs(src_slots: list[int], dst_slots: list[int]) -> list[tuple[int, int, int]]:
    """Merge paired slot lists into (src_start, dst_start, count) runs that are contiguous on both sides."""
    assert len(src_slots) == len(dst_slots)
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_slots, dst_slots):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def kv_write_runs(regions: tuple[MemRegion, ...] | list[MemRegion], region_ids: range,
                  src_slots: list[int], dst_slots: list[int]) -> list[WriteRun]:
    runs = slot_runs(src_slots, dst_slots)
    out = []
    for r in region_ids:
        item = regions[r].item_bytes
        out.extend(WriteRun(r, s * item, d * item, n * item) for s, d, n in runs)
    return out


class TransferEngine(abc.ABC):
    """One per engine process. Registers local regions once; writes runs into a peer's regions."""

    name: str

    def __init__(self, agent_name: str, host: str, regions: list[MemRegion], ib_device: str | None = None):
        self.agent_name = agent_name
        self.host = host
        self.regions = list(regions)
        self.ib_device = ib_device

    @abc.abstractmethod
    def local_info(self) -> AgentInfo: ...

    def check_peer_backend(self, info: AgentInfo) -> None:
        if info.backend != self.name:
            raise ValueError(f"peer {info.agent_name!r} uses backend {info.backend!r}, this engine is {self.name!r}")

    @abc.abstractmethod
    def add_peer(self, info: AgentInfo) -> None:
        """Idempotent: connect to / load the metadata of a peer so writes to it can start."""

    @abc.abstractmethod
    def remove_peer(self, agent_name: str) -> None: ...

    @abc.abstractmethod
    def write(self, peer: str, runs: list[WriteRun]) -> object:
        """Start writing local bytes into the peer's regions (same index). Returns a handle for poll()."""

    @abc.abstractmethod
    def poll(self, handle: object) -> TransferState:
        """TRANSFERRING, SUCCESS or FAILED."""

    def release(self, handle: object) -> None:  # noqa: B027 - optional hook
        """Free backend resources of a finished (or abandoned) write."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def create_transfer_engine(backend: str, agent_name: str, host: str, regions: list[MemRegion],
                           ib_device: str | None = None) -> TransferEngine:
    if backend == "fake":
        from pdserve.disagg.backends.fake import FakeTransferEngine

        logger.warning("transfer backend fake: no KV or embedding bytes move between servers (only metadata, "
                       "inline), so a disaggregated request decodes from uninitialised KV. For tests only; "
                       "serve with nixl (default) or mooncake")
        return FakeTransferEngine(agent_name, host, regions, ib_device)
    if backend == "nixl":
        from pdserve.disagg.backends.nixl import NixlTransferEngine

        return NixlTransferEngine(agent_name, host, regions, ib_device)
    if backend == "mooncake":
        from pdserve.disagg.backends.mooncake import MooncakeTransferEngine

        return MooncakeTransferEngine(agent_name, host, regions, ib_device)
    raise ValueError(f"unknown transfer backend {backend!r}")
