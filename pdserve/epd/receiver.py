"""Language side of EPD: receive image embeddings from encode servers into a registered buffer.

Lifecycle of one image prompt (room R, images 0..k-1 held by encoders named in the request):
1. expect(): rows for every image are reserved in the embedding buffer (all or nothing; the request waits
   for space otherwise) and EmbedDestination goes to each image's encoder, carrying this engine's AgentInfo.
2. The encoder writes the rows through the transfer engine (nixl / mooncake; fake sends them inline) and
   answers EmbedDone. The rows are copied onto the request (MMInputs) and freed at once.
3. When every image is in, the request is ready and the scheduler admits it.
Failures end the request with the cause: an encoder error (EmbedDone not ok), no EmbedDone within
PDSERVE_EPD_EMBEDDING_TIMEOUT, or a request that ended elsewhere (abort, PD failure). Rows a transfer may
still be writing are quarantined until the encoder's EmbedDone (or the timeout) before reuse.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from pdserve.config import EngineConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.transfer import MemRegion, create_transfer_engine
from pdserve.engine.request import Request
from pdserve.envs import ENVS
from pdserve.epd.buffers import RangeAllocator
from pdserve.epd.messages import EPD_MAX_FRAME_BYTES, EPD_MESSAGES, EmbedAbort, EmbedDestination, EmbedDone
from pdserve.epd.mm import MultimodalInput

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    req: Request
    mm: MultimodalInput
    deadline: float
    starts: list[int | None]  # buffer row of each image, once reserved
    done: list[bool]
    sent: bool = False
    stats: dict = field(default_factory=lambda: {"bytes": 0, "transfer_s": 0.0})


class EmbeddingReceiver:
    def __init__(self, config: EngineConfig, hidden: int, dtype: torch.dtype, device: torch.device):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.rows = ENVS.epd_buffer_tokens
        self.buf = torch.zeros(self.rows, hidden, dtype=dtype)  # [rows, H] host memory, registered
        self.row_bytes = hidden * self.buf.element_size()
        self.alloc = RangeAllocator(self.rows)
        self.agent_name = f"epd-lang-{uuid.uuid4().hex[:12]}"
        region = MemRegion(self.buf.data_ptr(), self.buf.numel() * self.buf.element_size(), self.row_bytes)
        self.transfer = create_transfer_engine(config.transfer_backend, self.agent_name, config.host, [region],
                                               config.ib_device)
        self.info = self.transfer.local_info()
        self.ctrl = ControlChannel(config.host, EPD_MESSAGES, config.auth_secret, EPD_MAX_FRAME_BYTES)
        self.moves_data = config.transfer_backend != "fake"
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.pending: dict[int, _Pending] = {}  # room -> request waiting for embeddings
        self.room_of: dict[str, int] = {}  # rid -> room
        self.quarantine: dict[tuple[int, int], tuple[int, int, float]] = {}  # (room, i) -> (start, rows, until)
        logger.info("EPD receiver %s: %d-row embedding buffer (%.1f MB), backend %s, control %s", self.agent_name,
                    self.rows, self.rows * self.row_bytes / 1e6, config.transfer_backend, self.ctrl.addr)

    # ---- requests --------------------------------------------------------------------------------------
    def expect(self, req: Request, mm: MultimodalInput) -> None:
        """Start fetching a request's embeddings. Raises ValueError for one that can never be served."""
        assert mm.room is not None
        if mm.room in self.pending:
            raise ValueError(f"EPD room {mm.room} is already in use by another request")
        if len(mm.remote) != len(mm.spans):
            raise ValueError(f"{len(mm.remote)} encoder entries for {len(mm.spans)} images")
        total = sum(s.length for s in mm.spans)
        if total > self.rows:
            raise ValueError(f"the images need {total} embedding rows, more than the buffer holds ({self.rows}; "
                             "PDSERVE_EPD_BUFFER_TOKENS)")
        p = _Pending(req, mm, time.monotonic() + ENVS.epd_embedding_timeout_s, [None] * len(mm.spans),
                     [False] * len(mm.spans))
        self.pending[mm.room] = p
        self.room_of[req.rid] = mm.room
        self._reserve(p)

    def _reserve(self, p: _Pending) -> bool:
        """All rows of the request, or none (no partial holds that could deadlock two requests)."""
        got = []
        for s in p.mm.spans:
            start = self.alloc.alloc(s.length)
            if start is None:
                for st, n in got:
                    self.alloc.free(st, n)
                return False
            got.append((start, s.length))
        for i, (start, _) in enumerate(got):
            p.starts[i] = start
            r = p.mm.remote[i]
            self.ctrl.send(r.encoder, EmbedDestination(
                p.mm.room, i, self.info, self.ctrl.addr, start * self.row_bytes, r.rows, self.hidden, self.dtype_name))
        p.sent = True
        return True

    def cancel(self, rid: str, reason: str) -> None:
        """The request ended (abort, failure elsewhere): tell its encoders, quarantine rows still in flight."""
        room = self.room_of.pop(rid, None)
        p = self.pending.pop(room, None) if room is not None else None
        if p is None:
            return
        until = time.monotonic() + ENVS.epd_embedding_timeout_s
        for i, start in enumerate(p.starts):
            if start is not None and not p.done[i]:
                self.quarantine[(p.mm.room, i)] = (start, p.mm.spans[i].length, until)
        if p.sent:
            for enc in {r.encoder for r in p.mm.remote}:
                self.ctrl.send(enc, EmbedAbort(p.mm.room, reason))

    # ---- polling ---------------------------------------------------------------------------------------
    def poll(self) -> list[tuple[Request, str]]:
        """Handle encoder messages and deadlines. Returns the requests to fail, with the reason."""
        failed: list[tuple[Request, str]] = []
        for msg in self.ctrl.recv_all():
            if isinstance(msg, EmbedDone):
                err = self._on_done(msg)
                if err is not None:
                    failed.append(err)
        now = time.monotonic()
        for room, p in list(self.pending.items()):
            if p.req.finished:
                self.cancel(p.req.rid, "the request ended")
            elif not p.sent:
                if not self._reserve(p) and now >= p.deadline:
                    failed.append((p.req, "no room in the embedding buffer within "
                                          f"{ENVS.epd_embedding_timeout_s:.0f} s (PDSERVE_EPD_BUFFER_TOKENS)"))
            elif now >= p.deadline:
                missing = sorted({p.mm.remote[i].encoder for i, d in enumerate(p.done) if not d})
                for addr in missing:  # drop messages queued for a silent peer; the next send reconnects
                    self.ctrl.forget(addr)
                failed.append((p.req, f"image embeddings for EPD room {room} did not arrive within "
                                      f"{ENVS.epd_embedding_timeout_s:.0f} s from encoder(s) {', '.join(missing)} "
                                      "(PDSERVE_EPD_EMBEDDING_TIMEOUT)"))
        for key, (start, n, until) in list(self.quarantine.items()):
            if now >= until:
                del self.quarantine[key]
                self.alloc.free(start, n)
        for req, reason in failed:
            self.cancel(req.rid, reason)
        return failed

    def _on_done(self, msg: EmbedDone) -> tuple[Request, str] | None:
        q = self.quarantine.pop((msg.room, msg.index), None)
        if q is not None:  # the request is gone; the write has ended: the rows are safe to reuse
            self.alloc.free(q[0], q[1])
            return None
        p = self.pending.get(msg.room)
        if p is None or not 0 <= msg.index < len(p.starts) or p.done[msg.index] or p.starts[msg.index] is None:
            return None
        i, start, n = msg.index, p.starts[msg.index], p.mm.spans[msg.index].length
        p.done[i] = True
        p.starts[i] = None
        if not msg.ok:
            self.alloc.free(start, n)
            return p.req, f"encoder {p.mm.remote[i].encoder} failed image {i}: {msg.error}"
        rows = self.buf[start:start + n]  # [n, H]
        if msg.data is not None:  # backends that move no data send the rows inline
            if len(msg.data) != n * self.row_bytes:
                self.alloc.free(start, n)
                return p.req, f"image {i}: {len(msg.data)} embedding bytes, expected {n * self.row_bytes}"
            rows.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(msg.data), dtype=torch.uint8))
        emb = rows.to(self.device, copy=True)  # [n, H], owned by the request
        self.alloc.free(start, n)
        p.stats["bytes"] += msg.nbytes or n * self.row_bytes
        p.stats["transfer_s"] += msg.transfer_s
        try:
            p.req.mm.set(i, emb)
        except ValueError as e:
            return p.req, str(e)
        if all(p.done):
            del self.pending[msg.room]
            self.room_of.pop(p.req.rid, None)
            logger.debug("EPD room %d: %d images, %d bytes in", msg.room, len(p.done), p.stats["bytes"])
        return None

    # ---- info ------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.pending or self.quarantine)

    def stats(self) -> dict[str, int]:
        return {"epd_waiting_reqs": len(self.pending), "epd_buffer_tokens_in_use": self.alloc.used,
                "epd_buffer_tokens": self.rows}

    def close(self) -> None:
        self.ctrl.close()
        self.transfer.close()
