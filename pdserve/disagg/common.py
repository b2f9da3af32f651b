"""Pieces both PD sides compose: registered memory (KV pool + metadata rows), transfer engine, control."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field

import msgspec

from pdserve.config import EngineConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.messages import PD_MESSAGES
from pdserve.disagg.metadata import MetadataBuffer
from pdserve.disagg.rank_transfer import RankTransfer
from pdserve.disagg.transfer import AgentInfo, MemRegion, TransferEngine, TransferState
from pdserve.engine.engine import Engine
from pdserve.engine.messages import RequestOutput
from pdserve.engine.request import Request
from pdserve.engine.stats import PDStats

logger = logging.getLogger(__name__)


@dataclass
class RoomState:
    """Per-request PD state, kept in Request.disagg. `state` is the one TransferState enum."""

    room: int
    state: TransferState
    deadline: float  # monotonic time after which BOOTSTRAPPING / TRANSFERRING counts as timed out
    peer: str | None = None  # prefill: decode agent name; decode: bootstrap "host:port"
    dst_slots: tuple[int, ...] = ()
    meta_row: int | None = None
    nonce: int = 0  # the destination's (KVDestination.nonce); 0 until the decode hands one out
    handle: object = None
    aborted: str | None = None  # reason, once either side gave up
    held_output: RequestOutput | None = None
    extra: dict = field(default_factory=dict)


class DisaggLink:
    """This engine's (TP rank 0's) KV pool + metadata rows registered with the transfer engine, the other TP
    ranks' agents, and this engine's control channel."""

    def __init__(self, engine: Engine, config: EngineConfig, role: str, num_meta_rows: int):
        self.engine = engine
        self.meta = MetadataBuffer(num_meta_rows)
        runner = engine.runner
        self.xfer = RankTransfer(config, 0, runner.kv, runner.model.full_arch.num_kv_heads,
                                 meta=MemRegion(self.meta.ptr, self.meta.nbytes, self.meta.row_bytes))
        self.transfer: TransferEngine = self.xfer.transfer
        self.agent_name = self.xfer.agent_name
        self.num_kv_regions, self.item_bytes = self.xfer.num_kv_regions, self.xfer.item_bytes
        self.head_bytes, self.kv_dtype = self.xfer.head_bytes, self.xfer.kv_dtype
        self.num_kv_heads = runner.model.full_arch.num_kv_heads
        self.meta_region = self.num_kv_regions
        self.tp_link = runner.tp_link  # None without TP
        self.rank_agents: tuple[AgentInfo, ...] = (self.xfer.local_info(),)
        if self.tp_link is not None:  # the other ranks registered theirs (tp_worker -> attach_tp_rank)
            parts = self.tp_link.gather(msgspec.msgpack.encode(self.rank_agents[0]))
            self.rank_agents = tuple(msgspec.msgpack.decode(p, type=AgentInfo) for p in parts)
        self.ctrl = ControlChannel(config.host, PD_MESSAGES, config.auth_secret)
        self.moves_data = config.transfer_backend != "fake"
        self.stats = PDStats()  # queues are filled in by the side at each load report
        logger.info("%s: transfer backend %s, control %s, %d TP ranks", self.agent_name, config.transfer_backend,
                    self.ctrl.addr, len(self.rank_agents))

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token holds in this rank's pool (every layer, K and V)."""
        return self.num_kv_regions * self.item_bytes

    def rank_call(self, payload: bytes) -> None:
        """Send a PD command to the other TP ranks (nothing without TP)."""
        if self.tp_link is not None:
            self.tp_link.call(payload)

    def all_reduce_min(self):
        """The TP group's MIN all-reduce for poll agreement (None without TP)."""
        return self.tp_link.group.all_reduce_min_cpu if self.tp_link is not None else None

    def fail(self, req: Request, reason: str) -> RequestOutput:
        """End a request with a clear error; its slots are freed by the scheduler."""
        eng = self.engine
        eng.requests.pop(req.rid, None)
        if not req.finished:
            eng.scheduler.finish(req, "abort", error=reason)
        else:
            req.finish_reason, req.error = "abort", reason
        return eng.make_output(req)

    def close(self) -> None:
        self.ctrl.close()
        self.xfer.close()


def now() -> float:
    return time.monotonic()


def kv_checksum(engine: Engine, slots: list[int]) -> int:
    """CRC-32 of the K and V rows of `slots` on every layer of this rank's KV pool, in order: what a peer with the
    same TP layout holds for the same prompt after a correct transfer (--disaggregation-kv-checksum)."""
    import torch

    kv = engine.runner.kv
    index = torch.tensor(slots, dtype=torch.long, device=kv.k[0].device)
    crc = 0
    for pool in (*kv.k, *kv.v):  # [num_slots, nKV, D] each
        rows = pool.index_select(0, index).contiguous().cpu()  # [n, nKV, D]
        crc = zlib.crc32(rows.view(torch.uint8).numpy(), crc)
    return crc
