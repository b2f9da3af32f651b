"""Decode side of PD disaggregation.

Lifecycle of one request on a decode server:
1. The request arrives with the same body the prefill got (bootstrap_host, bootstrap_port, bootstrap_room)
   and waits in the prealloc queue (BOOTSTRAPPING).
2. First contact with a prefill: a worker thread looks up its rank (GET /route on its bootstrap server);
   this engine then sends PeerRegister (how to write into its KV pool) once, and heartbeats start.
3. When the KV budget allows (admission counts running, preallocated and incoming KV plus a decode
   reservation) the prompt's slots and a metadata row are preallocated and KVDestination goes to the
   prefill (TRANSFERRING).
4. TransferDone(ok): the metadata row's room is checked (a mismatch fails the request: never decode from
   foreign or partial KV); the request joins the running batch with num_computed_tokens = prompt length
   and the first token, without recomputing the prompt, and streams (SUCCESS): the first token goes out
   at once, before the next decode step runs.
5. Failures end the request with a clear error (or, with --kv-load-failure-policy recompute, send it back to
   this engine's queue to prefill it here, unless the client aborted): TransferDone(ok=False), no TransferDone within
   SGLANG_DISAGGREGATION_WAITING_TIMEOUT, the prefill missing SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE
   heartbeats in a row or restarting (a new server_id), or a client abort. Once KVDestination went out, the
   prefill may still write into that destination, so its slots and metadata row are not freed with the request:
   they stay quarantined (AbortRoom tells the prefill) until the prefill's TransferDone with that destination's
   nonce says it will not write, or QUARANTINE_TTL_S passes (longer than a prefill may take to start and finish
   a write). Nothing else can be given those slots meanwhile, so a late write lands on nobody's KV.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from pdserve.config import EngineConfig
from pdserve.disagg.bootstrap import lookup_instance, lookup_rank
from pdserve.disagg.kv_slicing import num_local_kv_heads, prefill_ranks_for_decode
from pdserve.disagg.rank_transfer import Unstage, encode_command
from pdserve.disagg.common import DisaggLink, RoomState, kv_checksum, now
from pdserve.disagg.messages import AbortRoom, KVDestination, PeerRegister, PrefillLayout, RankInfo, TransferDone
from pdserve.disagg.transfer import TransferState
from pdserve.engine.engine import Engine
from pdserve.engine.tp_worker import TensorRanksFailed
from pdserve.engine.messages import GenerateRequest, LoadReport, RequestOutput, TokenLogprob
from pdserve.engine.request import Request, RequestStatus
from pdserve.envs import ENVS
from pdserve.model.loader import ResolvedModel

logger = logging.getLogger(__name__)

RESERVED_DECODE_TOKENS = 32  # per admitted request, kept free so running decodes can grow
# How long a failed request's destination stays quarantined without the prefill's word: the prefill starts a
# write within its waiting timeout of the destination's arrival and ends it within its transfer timeout.
QUARANTINE_TTL_S = ENVS.disagg_waiting_timeout_s + ENVS.disagg_transfer_timeout_s + 10.0


@dataclass
class Quarantined:
    """A destination a prefill may still write into: held until the prefill's word or the TTL."""

    room: int
    nonce: int
    slots: list[int]
    meta_row: int
    until: float
    peer: str  # "host:port" of the prefill's bootstrap server
    server_id: str  # of the prefill process that had the destination


@dataclass
class PrefillPeer:
    """A prefill instance (its bootstrap server): its layout and ranks, learned at first contact."""

    key: str  # "host:port" of its bootstrap server
    host: str
    port: int
    lookup: Future | None = None
    layout: PrefillLayout | None = None
    ranks: list[list[RankInfo]] | None = None  # [dp rank][tp rank]
    ctrl_addrs: list[str] | None = None  # per dp rank: its TP rank 0's control socket
    failures: int = 0
    dead: str | None = None  # set by the heartbeat thread
    replaced_by: str | None = None  # server_id of a new prefill process on this address (heartbeat thread)


class DecodeEngine:

    def __init__(self, config: EngineConfig, resolved: ResolvedModel | None = None):
        self.config = config
        self.engine = Engine(config, resolved)
        self.max_total_tokens, self.context_len = self.engine.max_total_tokens, self.engine.context_len
        self.kernel_plan = self.engine.kernel_plan
        self.link = DisaggLink(self.engine, config, "decode", num_meta_rows=4 * config.max_running_requests + 16)
        self.pool = ThreadPoolExecutor(ENVS.disagg_thread_pool_size, thread_name_prefix="bootstrap")
        self.peers: dict[str, PrefillPeer] = {}
        self.prealloc: list[Request] = []  # BOOTSTRAPPING: waiting for peer or memory
        self.transferring: dict[int, Request] = {}  # room -> request whose KV is on its way
        self.rooms: dict[int, Request] = {}  # every live PD request not yet running
        self.quarantine: dict[tuple[int, int], Quarantined] = {}  # (room, nonce) -> destination on hold
        self.num_staged = 0  # destinations handed out with lent slots (prefill TP > decode TP)
        self.num_local_prefills = 0  # requests without bootstrap fields, prefilled here (decode-only fallback)
        self.num_recomputed = 0  # PD requests whose KV did not come, prefilled here (--kv-load-failure-policy)
        self._faults = random.Random(ENVS.fault_seed) if ENVS.fault_kv_corrupt_p > 0 else None  # tests only
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()

    # ---- engine-process interface ----------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.engine.has_work  # PD queues are polled every idle_wait_s by the engine loop

    @property
    def control_socket(self):
        return self.link.ctrl.pull

    @property
    def idle_wait_s(self) -> float:
        """How long the idle engine loop may sleep: short while KV is in flight, else until a deadline."""
        return 0.005 if self.prealloc else 0.05  # TransferDone wakes the loop through the control socket

    def add_request(self, g: GenerateRequest) -> None:
        b = g.bootstrap
        if b is None:  # decode-only fallback: no prefill server is involved, this engine prefills the prompt
            self.engine.add_request(g)
            self.num_local_prefills += 1
            return
        if b.host is None:
            raise ValueError("a decode server needs bootstrap_host with bootstrap_room")
        if b.room in self.rooms:
            raise ValueError(f"bootstrap_room {b.room} is already in use by another request")
        self.engine.add_request(g)
        req = self.engine.requests[g.rid]
        self.engine.scheduler.waiting.remove(req)  # joins the running batch once its KV arrived
        req.input_logprobs_sent = True  # the prefill answers input logprobs
        key = f"{b.host}:{b.port or self.config.bootstrap_port}"
        req.disagg = RoomState(b.room, TransferState.BOOTSTRAPPING, now() + ENVS.disagg_waiting_timeout_s, peer=key)
        req.disagg.extra["prefill_dp_rank"] = b.prefill_dp_rank
        self.rooms[b.room] = req
        self.prealloc.append(req)
        if key not in self.peers:
            self._bootstrap_peer(key, b.host, b.port or self.config.bootstrap_port)

    def abort(self, rid: str, reason: str = "aborted by client") -> RequestOutput | None:
        req = self.engine.requests.get(rid)
        if req is None:
            return None
        st: RoomState = req.disagg
        if st is not None and st.state is not TransferState.SUCCESS:
            return self._fail(req, reason, client_abort=True)
        self.engine.abort(rid)
        return self.engine.make_output(req)

    def step(self) -> list[RequestOutput]:
        outs = self._handle_control()
        outs += self._check_peers()
        outs += self._preallocate()
        outs += self._expire()
        if outs:  # first tokens (and failures) go out now, not after the decode step that follows (tens of ms)
            return outs
        return self.engine.step()

    def load(self) -> LoadReport:
        r = self.engine.load()
        pd = replace(self.link.stats, num_decode_prealloc_queue_reqs=len(self.prealloc),
                     num_decode_transfer_queue_reqs=len(self.transferring))
        extra = {**r.extra, "control_frames_dropped": sum(self.link.ctrl.dropped.values()),
                 "kv_quarantined_tokens": sum(len(q.slots) for q in self.quarantine.values()),
                 "kv_transfers_staged": self.num_staged, "num_local_prefill_reqs": self.num_local_prefills,
                 "kv_load_recomputed": self.num_recomputed}
        return replace(r, num_reqs=r.num_reqs + len(self.prealloc) + len(self.transferring),
                       num_waiting_reqs=r.num_waiting_reqs + len(self.prealloc), extra=extra,
                       stats=replace(r.stats, pd=pd) if r.stats is not None else None)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.link.close()

    # ---- peers -----------------------------------------------------------------------------------------
    def _bootstrap_peer(self, key: str, host: str, port: int) -> None:
        peer = PrefillPeer(key, host, port)
        peer.lookup = self.pool.submit(lookup_instance, host, port)
        self.peers[key] = peer

    def _check_peers(self) -> list[RequestOutput]:
        outs = []
        for key, peer in list(self.peers.items()):
            if peer.lookup is not None and peer.lookup.done():
                try:
                    layout, ranks = peer.lookup.result()
                    self._release_replaced(peer.key, ranks[0][0].server_id)
                    for group in ranks:
                        for info in group:
                            self._check_layout(info)
                    peer.layout, peer.ranks = layout, ranks
                    peer.ctrl_addrs = [f"tcp://{_bracket(g[0].rank_ip)}:{g[0].rank_port}" for g in ranks]
                    link = self.link
                    hello = PeerRegister(link.rank_agents[0], link.ctrl.addr, link.rank_agents, link.num_kv_heads,
                                         link.head_bytes, self.config.page_size)
                    for addr in peer.ctrl_addrs:  # every dp group of the instance
                        link.ctrl.send(addr, hello)
                except Exception as e:
                    peer.dead = f"cannot bootstrap with prefill at {key}: {e}"
                peer.lookup = None
            if peer.dead:
                outs += self._drop_peer(peer)
        return outs

    def _release_replaced(self, key: str, server_id: str) -> None:
        """A new prefill process owns the address (its bootstrap port): the one that had these destinations is
        gone and writes nothing more, so they are free now rather than at the end of their TTL."""
        self._release_where(lambda held: held.peer == key and held.server_id != server_id)

    def _check_layout(self, rank: RankInfo) -> None:
        """The prefill must write what this decode holds: the same backend, page size, KV dtype, layers and KV
        heads, and TP sizes that map onto each other (bytes per token differ when TP sizes do)."""
        if rank.backend != self.config.transfer_backend:
            raise ValueError(f"prefill uses transfer backend {rank.backend!r}, this decode uses "
                             f"{self.config.transfer_backend!r} (--disaggregation-transfer-backend must match)")
        if rank.page_size != self.config.page_size:
            raise ValueError(f"prefill uses --page-size {rank.page_size}, this decode {self.config.page_size} "
                             "(prefill and decode must use the same page size)")
        link = self.link
        theirs = (rank.num_regions, rank.num_kv_heads, rank.head_bytes, rank.kv_cache_dtype)
        mine = (link.num_kv_regions, link.num_kv_heads, link.head_bytes, link.kv_dtype)
        if theirs != mine:
            raise ValueError(f"prefill KV layout ({theirs[0]} regions, {theirs[1]} KV heads of {theirs[2]} bytes, "
                             f"{theirs[3]}) differs from this decode's ({mine[0]}, {mine[1]} of {mine[2]}, {mine[3]}): "
                             "different models or dtypes?")
        prefill_ranks_for_decode(rank.attn_tp_size, self.config.tp_size, 0)  # raises for TP sizes that cannot map

    def _drop_peer(self, peer: PrefillPeer) -> list[RequestOutput]:
        """Fail every request bound to a dead (or unreachable) prefill; forget it so a restart re-bootstraps."""
        logger.warning("%s", peer.dead)
        outs = [out for req in list(self.rooms.values()) if req.disagg.peer == peer.key
                if (out := self._fail(req, peer.dead)) is not None]
        if peer.replaced_by is not None:
            self._release_replaced(peer.key, peer.replaced_by)
        del self.peers[peer.key]
        for addr in peer.ctrl_addrs or []:
            self.link.ctrl.forget(addr)
        return outs

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(ENVS.disagg_heartbeat_interval_s):
            for peer in list(self.peers.values()):
                if peer.ranks is None or peer.dead:
                    continue
                try:  # the route, not just /health: a prefill restarted on the same address has a new id
                    rank = lookup_rank(peer.host, peer.port, timeout=min(2.0, ENVS.disagg_heartbeat_interval_s))
                except Exception:  # noqa: BLE001 - any failure is a missed heartbeat
                    rank = None
                known = peer.ranks[0][0].server_id
                if rank is not None and rank.server_id != known:
                    peer.replaced_by = rank.server_id
                    peer.dead = (f"prefill server at {peer.key} restarted (server id {known} -> "
                                 f"{rank.server_id}): its in-flight transfers are lost")
                    continue
                if rank is not None:
                    peer.failures = 0
                    continue
                peer.failures += 1
                if peer.failures >= ENVS.disagg_heartbeat_max_failure:
                    peer.dead = (f"prefill server at {peer.key} is unreachable "
                                 f"({peer.failures} failed heartbeats)")

    def _send_peer(self, st: RoomState, msg: object) -> None:
        """To the prefill engine (dp group) that has this room."""
        peer = self.peers.get(st.peer or "")
        if peer is not None and peer.ctrl_addrs:
            self.link.ctrl.send(peer.ctrl_addrs[st.extra.get("dp", 0)], msg)

    # ---- queues ----------------------------------------------------------------------------------------
    def _preallocate(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        kv = self.engine.scheduler.kv
        sched = self.engine.scheduler
        for req in list(self.prealloc):
            st: RoomState = req.disagg
            peer = self.peers.get(st.peer)
            if peer is None or peer.ranks is None:
                continue
            st.extra.setdefault("bootstrap_s", now() - req.arrival_time)
            asked = st.extra.get("prefill_dp_rank")
            if asked is not None and asked >= len(peer.ranks):
                outs.append(self._fail(req, f"disagg_prefill_dp_rank {asked} is out of range: the prefill at "
                                            f"{st.peer} has {len(peer.ranks)} dp ranks", client_abort=True))
                continue
            n = len(req.prompt_ids)
            busy = len(sched.running) + len(self.transferring)
            if len(sched.running) + len(self.transferring) >= self.config.max_running_requests:
                break
            staged = self._prefill_heads(peer) < num_local_kv_heads(self.link.num_kv_heads, self.config.tp_size)
            if kv.num_available < n * (2 if staged else 1) + RESERVED_DECODE_TOKENS * (busy + 1):
                break
            row = self.link.meta.alloc()
            if row is None or not kv.grow(req, n):
                if row is not None:
                    self.link.meta.free(row)
                break
            stage_start = self._lend_stage(st, peer, n)
            # The request holds whole pages; the destination is the first n slots of them (the prompt's).
            st.dst_slots, st.meta_row, st.nonce = tuple(req.slots[:n]), row, secrets.randbits(63) | 1
            st.state = TransferState.TRANSFERRING
            # The router's word (SMG's disagg_prefill_dp_rank), else SGLang's follow_bootstrap_room.
            asked, num_dp = st.extra.get("prefill_dp_rank"), len(peer.ctrl_addrs)
            st.extra["dp"] = st.room % num_dp if asked is None else asked
            self.prealloc.remove(req)
            self.transferring[st.room] = req
            st.extra["destination_sent"] = now()
            page = self.config.page_size
            pages = tuple(req.slots[i] // page for i in range(0, n, page)) if page > 1 else ()
            self.link.ctrl.send(peer.ctrl_addrs[st.extra["dp"]], KVDestination(
                st.room, self.link.agent_name, () if pages else st.dst_slots, row, n, st.nonce, stage_start, page,
                pages))
        return outs

    def _lend_stage(self, st: RoomState, peer: PrefillPeer, num_tokens: int) -> int | None:
        """Prefill TP > decode TP: n free contiguous slots (the same on every decode rank) where the prefill ranks
        write their whole slots, regrouped here on arrival (rank_transfer.unstage): one run per range instead of
        one per slot. None: not needed, or no contiguous room (the heads then come slot by slot)."""
        prefill_heads = self._prefill_heads(peer)
        if prefill_heads >= num_local_kv_heads(self.link.num_kv_heads, self.config.tp_size):
            return None
        got = self.engine.scheduler.kv.lend_run(num_tokens)
        if not got:
            return None
        st.extra["stage"], st.extra["src_heads"] = got, prefill_heads
        self.num_staged += 1
        return got[0]

    def _prefill_heads(self, peer: PrefillPeer) -> int:
        """KV heads in one slot of the prefill's ranks."""
        return num_local_kv_heads(self.link.num_kv_heads, peer.ranks[0][0].attn_tp_size)

    def _unstage(self, st: RoomState) -> None:
        """The KV arrived staged: regroup it into the request's slots on every rank, return the lent slots."""
        got = st.extra.pop("stage", None)
        if got is None:
            return
        cmd = Unstage(list(st.dst_slots), got[0], st.extra["src_heads"])
        self.link.xfer.unstage(cmd.dst_slots, cmd.stage_start, cmd.src_heads)
        self.link.rank_call(encode_command(cmd))
        self.engine.scheduler.kv.free_detached(got)

    def _handle_control(self) -> list[RequestOutput]:
        outs = []
        for msg in self.link.ctrl.recv_all():
            try:  # one message fails at most the room it names, never the engine
                outs += self._on_message(msg)
            except TensorRanksFailed:
                raise  # the engine's TP group is gone: not this message's fault
            except Exception:  # noqa: BLE001
                logger.exception("control message %s failed", type(msg).__name__)
        return outs

    def _on_message(self, msg: object) -> list[RequestOutput]:
        if isinstance(msg, TransferDone):
            held = self.quarantine.pop((msg.room, msg.nonce), None)
            if held is not None:  # the prefill will not write there: the destination is free again
                self._release(held)
                return []
            req = self.transferring.get(msg.room)
            if req is None or req.disagg.nonce != msg.nonce:
                return []  # late news of an earlier use of this room
            if not msg.ok:
                out = self._fail(req, msg.error or "prefill reported a failed transfer", prefill_done=True,
                                 client_abort=msg.client_abort)
            else:
                out = self._join(req, msg)
            return [] if out is None else [out]
        if isinstance(msg, AbortRoom):  # a prefill gives up (it answers TransferDone for what it held)
            req = self.rooms.get(msg.room)
            if req is not None and (msg.nonce == 0 or msg.nonce == req.disagg.nonce):
                out = self._fail(req, msg.reason)
                return [] if out is None else [out]
            return []
        logger.warning("unexpected %s on a decode's control socket", type(msg).__name__)
        return []

    def _join(self, req: Request, done: TransferDone) -> RequestOutput | None:
        st: RoomState = req.disagg
        meta = self.link.meta
        if done.meta_bytes is not None:
            meta.set_row_bytes(st.meta_row, done.meta_bytes)
        row = meta.read(st.meta_row)
        if row is None or row.room != st.room or row.nonce != st.nonce:
            found = "no metadata" if row is None else f"room {row.room}, nonce {row.nonce}"
            return self._fail(req, f"metadata check failed for room {st.room} ({found}): refusing foreign KV",
                              prefill_done=True)
        if self._faults is not None and self._faults.random() < ENVS.fault_kv_corrupt_p:  # tests only
            self.engine.runner.kv.k[0][st.dst_slots[-1]].view(-1)[0] += 1.0
        if done.kv_checksum is not None and kv_checksum(self.engine, list(st.dst_slots)) != done.kv_checksum:
            self.link.stats.count_failure(in_bootstrap=False)
            return self._fail(req, f"KV checksum mismatch for room {st.room}: the prompt's KV arrived corrupted",
                              prefill_done=True)
        self._unstage(st)  # first: if it raises, the room is still tracked (and fails by its deadline)
        del self.transferring[st.room]
        del self.rooms[st.room]
        meta.free(st.meta_row)
        st.meta_row = None
        # The write's time is the prefill's (from here it would include the prefill's queue and compute).
        sent, bootstrap_s = st.extra["destination_sent"], st.extra.get("bootstrap_s", 0.0)
        self.link.stats.record_transfer(len(st.dst_slots) * self.link.kv_bytes_per_token, done.transfer_ms / 1e3,
                                        bootstrap_s, max(sent - req.arrival_time - bootstrap_s, 0.0))
        st.state = TransferState.SUCCESS
        req.num_computed_tokens = len(req.prompt_ids)
        req.num_cached_tokens = row.cached_tokens
        req.output_ids.append(row.first_token)
        if req.return_logprob:
            req.pending_logprobs.append(TokenLogprob(row.first_token, row.logprob, row.top[: req.top_logprobs_num]))
        req.status = RequestStatus.RUNNING
        sched = self.engine.scheduler
        sched.running.append(req)
        sched.stats.queue_time.observe(0.0)  # a prefilled request joins the running batch as its KV lands: no queue
        sched.stop.check(req)
        if req.finish_reason is not None:
            sched.finish(req, req.finish_reason)
            self.engine.requests.pop(req.rid, None)
        return self.engine.make_output(req)

    def _expire(self) -> list[RequestOutput]:
        t = now()
        for held in self._release_where(lambda held: t >= held.until):
            logger.warning("room %d: no word from the prefill in %.0f s; its quarantined destination is released",
                           held.room, QUARANTINE_TTL_S)
        return [out for req in list(self.rooms.values()) if t >= req.disagg.deadline
                if (out := self._fail(req, f"waiting timeout: the KV for room {req.disagg.room} did not arrive within "
                                           f"{ENVS.disagg_waiting_timeout_s:.0f} s "
                                           "(SGLANG_DISAGGREGATION_WAITING_TIMEOUT)")) is not None]

    def _fail(self, req: Request, reason: str, prefill_done: bool = False,
              client_abort: bool = False) -> RequestOutput | None:
        """End a request that is not running yet (None: it went back to this engine's queue instead, under
        --kv-load-failure-policy recompute). prefill_done: the prefill said it will not write (its
        TransferDone); otherwise a destination it was given is quarantined and the prefill is told.
        client_abort: the client gave up or asked for what cannot be (not counted as a PD failure)."""
        st: RoomState = req.disagg
        if st.state is not TransferState.SUCCESS:
            if not client_abort:
                self.link.stats.count_failure(in_bootstrap=st.state is TransferState.BOOTSTRAPPING)
            sent = st.state is TransferState.TRANSFERRING  # the prefill has (or will have) this destination
            st.state = TransferState.FAILED
            self.rooms.pop(st.room, None)
            self.transferring.pop(st.room, None)
            if req in self.prealloc:
                self.prealloc.remove(req)
            peer = self.peers.get(st.peer or "")
            if sent and not prefill_done:
                server_id = peer.ranks[0][0].server_id if peer is not None and peer.ranks is not None else ""
                held_slots = self.engine.scheduler.kv.detach(req) + st.extra.pop("stage", [])
                self.quarantine[(st.room, st.nonce)] = Quarantined(
                    st.room, st.nonce, held_slots, st.meta_row, now() + QUARANTINE_TTL_S, st.peer or "", server_id)
                st.meta_row = None
                self._send_peer(st, AbortRoom(st.room, reason, st.nonce, self.link.agent_name))
            else:
                if st.meta_row is not None:
                    self.link.meta.free(st.meta_row)
                    st.meta_row = None
                if "stage" in st.extra:
                    self.engine.scheduler.kv.free_detached(st.extra.pop("stage"))
            if (self.config.kv_load_failure_policy == "recompute" and not client_abort and not req.finished
                    and req.inputs_ready):  # an image prompt's embeddings are not here: it fails instead
                self._recompute(req, reason)
                return None
        return self.link.fail(req, reason)

    def _recompute(self, req: Request, reason: str) -> None:
        """--kv-load-failure-policy recompute: the prompt's KV will not come; this engine prefills it itself."""
        logger.warning("room %d: %s; prefilling the prompt here (--kv-load-failure-policy recompute)",
                       req.disagg.room, reason)
        sched = self.engine.scheduler
        sched.kv.free_detached(sched.kv.detach(req))  # whatever a preallocated destination still held
        req.disagg, req.input_logprobs_sent, req.num_computed_tokens = None, False, 0
        req.status = RequestStatus.WAITING
        self.num_local_prefills += 1
        self.num_recomputed += 1
        sched.add(req)

    def _release(self, held: Quarantined) -> None:
        self.engine.scheduler.kv.free_detached(held.slots)
        self.link.meta.free(held.meta_row)

    def _release_where(self, pred) -> list[Quarantined]:
        """Release every quarantined destination `pred` picks; returns them."""
        picked = [held for held in self.quarantine.values() if pred(held)]
        for held in picked:
            del self.quarantine[(held.room, held.nonce)]
            self._release(held)
        return picked


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
