"""Pieces both PD sides compose: registered memory (KV pool + metadata rows), transfer engine, control."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from pdserve.config import EngineConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.messages import PD_MESSAGES
from pdserve.disagg.metadata import MetadataBuffer
from pdserve.disagg.transfer import MemRegion, TransferEngine, TransferState, create_transfer_engine
from pdserve.engine.engine import Engine
from pdserve.engine.messages import RequestOutput
from pdserve.engine.request import Request

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
    """KV pool + metadata rows registered with the transfer engine, and this engine's control channel."""

    def __init__(self, engine: Engine, config: EngineConfig, role: str, num_meta_rows: int):
        self.engine = engine
        self.meta = MetadataBuffer(num_meta_rows)
        kv = engine.runner.kv
        regions = []
        for k, v in zip(kv.k, kv.v):
            for t in (k, v):
                regions.append(MemRegion(t.data_ptr(), t.numel() * t.element_size(), t[0].numel() * t.element_size()))
        self.num_kv_regions = len(regions)
        self.item_bytes = regions[0].item_bytes
        self.kv_dtype = str(kv.k[0].dtype).removeprefix("torch.")
        regions.append(MemRegion(self.meta.ptr, self.meta.nbytes, self.meta.row_bytes))
        self.meta_region = len(regions) - 1
        self.agent_name = f"{role}-{uuid.uuid4().hex[:12]}"
        self.transfer: TransferEngine = create_transfer_engine(config.transfer_backend, self.agent_name, config.host,
                                                               regions, config.ib_device)
        self.ctrl = ControlChannel(config.host, PD_MESSAGES, config.auth_secret)
        self.moves_data = config.transfer_backend != "fake"
        logger.info("%s: transfer backend %s, control %s, %d regions", self.agent_name, config.transfer_backend,
                    self.ctrl.addr, len(regions))

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
        self.transfer.close()


def now() -> float:
    return time.monotonic()
