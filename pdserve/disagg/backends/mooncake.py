"""Mooncake Transfer Engine backend over TCP, P2P handshake (no metadata server).

Package: ``mooncake-transfer-engine-non-cuda==0.3.13.post1`` (needs ``libibverbs.so.1`` at import even for
TCP: ``apt-get install libibverbs1``). payload = the session id ``host:rpc_port``.

Ports and addresses (checked with ``ss -ltnp``): every engine listens on two TCP ports, both picked at
random from Mooncake's RPC port range (about 15000-17000; MC_MIN_RPC_PORT / MC_MAX_RPC_PORT):

* the P2P handshake RPC port (the ``:port`` of the session id), bound to ``0.0.0.0``;
* the TCP transport's data port, bound to ``[::]`` dual-stack (all IPv4 and IPv6 addresses).

**Neither can be bound to 127.0.0.1 only**: the data acceptor is hard-coded to the IPv6 wildcard, and
neither ``MC_TCP_BIND_ADDRESS`` nor the local hostname changes the bind address (they only change what
is advertised). Mooncake (TCP protocol v2) checks that every incoming write lands inside a registered
buffer, so a stranger reaching those ports can at most overwrite the registered KV pool; on an untrusted
network firewall the port range or run the servers in a network namespace.

Transfers: Mooncake's TCP transport rejects (fails, does not queue) work beyond
MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER requests in flight to one peer (1024 by default). Runs are merged
(adjacent on both sides), then submitted one request per run with ``transfer_submit_write`` and polled
with the non-blocking ``transfer_check_status``, keeping at most half that limit in flight per peer;
``poll()`` reaps finished requests and submits more. ``batch_transfer_async_write`` exists, but its only
completion check, ``get_batch_transfer_status``, blocks and busy-spins a core until the whole batch is
done (a thread per waiting batch on a 2-core box), and ``transfer_check_status`` looks only at a batch's
first request, so batches cannot be polled. Measured (benchmarks/kv_transfer_backends.py, 2 cores): 1-2 GB/s
for contiguous destination slots (60 runs), but ~30-40 us per run, so a scattered write of one 768 B slot
per run crawls at 0.02 GB/s (7.5 s for 4096 tokens); more lanes (MC_TCP_LANES_PER_PEER) do not help.

Completion means the receiver acknowledged that the bytes are in its memory (protocol v2). A dead peer
fails fast (connection refused / reset); a hung one fails after MC_TRANSFER_TIMEOUT (30 s) plus 1 s/GB.
Logs: MC_LOG_LEVEL defaults to WARNING here (Mooncake logs every handshake at INFO).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from pdserve.disagg.backends._runs import merge_adjacent, run_addresses
from pdserve.disagg.transfer import AgentInfo, MemRegion, TransferEngine, TransferState, WriteRun

logger = logging.getLogger(__name__)


def _load_engine_cls() -> Any:
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake.engine import TransferEngine as MooncakeEngine
    except ImportError as e:
        raise ImportError("Mooncake is not importable (pip install mooncake-transfer-engine-non-cuda==0.3.13.post1;"
                          f" apt-get install libibverbs1): {e}") from e
    return MooncakeEngine


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        return default


class _McWrite:
    __slots__ = ("peer", "nbytes", "src", "dst", "lens", "next_idx", "bids", "state", "error", "deadline")

    def __init__(self, peer: str, src: np.ndarray, dst: np.ndarray, lens: np.ndarray, timeout_s: float):
        self.peer = peer
        self.src, self.dst, self.lens = src.tolist(), dst.tolist(), lens.tolist()
        self.nbytes = int(sum(self.lens))
        self.next_idx = 0
        self.bids: set[int] = set()
        self.state = TransferState.TRANSFERRING if self.src else TransferState.SUCCESS
        self.error: str | None = None
        self.deadline = time.monotonic() + timeout_s + self.nbytes / 1e9

    def __repr__(self) -> str:
        err = f" {self.error}" if self.error else ""
        return f"<mooncake write to {self.peer}: {self.nbytes} B {self.state.value}{err}>"


class _Peer:
    __slots__ = ("info", "session", "queue", "inflight")

    def __init__(self, info: AgentInfo):
        self.info = info
        self.session = info.payload.decode()
        self.queue: collections.deque[_McWrite] = collections.deque()  # handles with runs left to submit
        self.inflight: dict[int, _McWrite | None] = {}  # batch id -> handle (None: handle gone, still reap)


class MooncakeTransferEngine(TransferEngine):
    name = "mooncake"

    def __init__(self, agent_name: str, host: str, regions: list[MemRegion], ib_device: str | None = None):
        super().__init__(agent_name, host, regions, ib_device)
        self._engine = _load_engine_cls()()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(f"mooncake: initialize({host!r}, P2PHANDSHAKE, tcp) failed with {rc}")
        self._session = f"{host}:{self._engine.get_rpc_port()}"
        self._ptrs = [m.ptr for m in self.regions]
        if self._ptrs:
            rc = self._engine.batch_register_memory(self._ptrs, [m.nbytes for m in self.regions])
            if rc != 0:
                raise RuntimeError(f"mooncake: registering {len(self._ptrs)} regions failed with {rc}")
        self._window = max(1, _env_int("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", 1024) // 2)
        self._timeout_s = float(max(5, _env_int("MC_TRANSFER_TIMEOUT", 30)))
        self._lock = threading.RLock()
        self._peers: dict[str, _Peer] = {}
        self._orphans: set[int] = set()  # batch ids of removed peers, checked until Mooncake frees them

    @property
    def session_id(self) -> str:
        return self._session

    def local_info(self) -> AgentInfo:
        return AgentInfo(self.name, self.agent_name, self._session.encode(), tuple(self.regions))

    def add_peer(self, info: AgentInfo) -> None:
        self.check_peer_backend(info)
        with self._lock:
            old = self._peers.get(info.agent_name)
            if old is not None:
                if old.info.payload == info.payload and old.info.regions == info.regions:
                    return
                self._drop_peer(old, "peer re-registered with new metadata")
            self._peers[info.agent_name] = _Peer(info)

    def remove_peer(self, agent_name: str) -> None:
        with self._lock:
            p = self._peers.pop(agent_name, None)
            if p is not None:
                self._drop_peer(p, "peer removed")

    def write(self, peer: str, runs: list[WriteRun] | np.ndarray) -> _McWrite:
        with self._lock:
            p = self._peers.get(peer)
            if p is None:
                raise ValueError(f"mooncake: unknown peer {peer!r}; call add_peer first")
            src, dst, lens = merge_adjacent(*run_addresses(self.regions, p.info.regions, runs))
            h = _McWrite(peer, src, dst, lens, self._timeout_s)
            if h.state is TransferState.TRANSFERRING:
                p.queue.append(h)
                self._progress(p)
            return h

    def poll(self, handle: object) -> TransferState:
        assert isinstance(handle, _McWrite)
        if handle.state is TransferState.TRANSFERRING:
            with self._lock:
                p = self._peers.get(handle.peer)
                if p is not None and handle.state is TransferState.TRANSFERRING:
                    self._progress(p)
                if handle.state is TransferState.TRANSFERRING and time.monotonic() > handle.deadline:
                    self._fail(p, handle, f"timed out after {self._timeout_s:.0f} s + {handle.nbytes / 1e9:.1f} s")
        return handle.state

    def release(self, handle: object) -> None:
        assert isinstance(handle, _McWrite)
        with self._lock:
            if handle.state is TransferState.TRANSFERRING:
                self._fail(self._peers.get(handle.peer), handle, "released before completion", log=False)

    def close(self) -> None:
        with self._lock:
            for p in list(self._peers.values()):
                self._drop_peer(p, "engine closed")
            self._peers.clear()
            deadline = time.monotonic() + 2.0
            while self._orphans and time.monotonic() < deadline:  # let the io thread stop touching our memory
                self._reap_orphans()
                time.sleep(0.001)
            if self._ptrs:
                self._engine.batch_unregister_memory(self._ptrs)
                self._ptrs = []

    # --- internals (caller holds self._lock) ---

    def _check(self, bid: int) -> int:
        """1 done, -1 failed, -2 timed out, 0 in progress. Mooncake frees the batch on 1 and -1."""
        return self._engine.transfer_check_status(bid)

    def _progress(self, p: _Peer) -> None:
        self._reap_orphans()
        for bid, h in list(p.inflight.items()):
            st = self._check(bid)
            if st == 0:
                continue
            del p.inflight[bid]
            if h is None or h.state is not TransferState.TRANSFERRING:
                continue
            h.bids.discard(bid)
            if st != 1:
                self._fail(p, h, f"mooncake request failed (status {st}) writing to {p.session}")
            elif not h.bids and h.next_idx == len(h.src):
                h.state = TransferState.SUCCESS
        while p.queue and len(p.inflight) < self._window:
            h = p.queue[0]
            n = len(h.src)
            while h.state is TransferState.TRANSFERRING and h.next_idx < n and len(p.inflight) < self._window:
                i = h.next_idx
                bid = self._engine.transfer_submit_write(p.session, h.src[i], h.dst[i], h.lens[i])
                h.next_idx += 1
                if bid <= 0:
                    self._fail(p, h, f"mooncake could not submit a write to {p.session} (peer unreachable?)")
                    break
                p.inflight[bid] = h
                h.bids.add(bid)
            if h.state is not TransferState.TRANSFERRING or h.next_idx == n:
                if p.queue and p.queue[0] is h:
                    p.queue.popleft()

    def _fail(self, p: _Peer | None, h: _McWrite, why: str, log: bool = True) -> None:
        h.state = TransferState.FAILED
        h.error = why
        if log:
            logger.warning("mooncake: write of %d B to %s failed: %s", h.nbytes, h.peer, why)
        if p is not None:
            try:
                p.queue.remove(h)
            except ValueError:
                pass
            for bid in h.bids:  # still in Mooncake's hands: keep reaping them (and counting them in the window)
                if bid in p.inflight:
                    p.inflight[bid] = None
        h.bids = set()

    def _drop_peer(self, p: _Peer, why: str) -> None:
        for h in list(p.queue) + [h for h in p.inflight.values() if h is not None]:
            if h.state is TransferState.TRANSFERRING:
                self._fail(p, h, why, log=False)
        p.queue.clear()
        self._orphans.update(p.inflight)
        p.inflight.clear()

    def _reap_orphans(self) -> None:
        for bid in list(self._orphans):
            if self._check(bid) != 0:
                self._orphans.discard(bid)
