"""Prefill side of PD disaggregation.

Lifecycle of one request on a prefill server:
1. The bootstrap server (beside this engine, default port 8998) holds this rank's control address; decode
   servers look it up (GET /route) and send PeerRegister once per peer: how to write into their memory.
2. The request arrives with a bootstrap_room; max_new_tokens is forced to 1 and it waits in the bootstrap
   queue (BOOTSTRAPPING) until the decode's KVDestination for the room arrives (destination slots and a
   metadata row). No destination within SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT: FAILED, clear error.
3. With its destination known (WAITING_FOR_INPUT) it enters the scheduler, which prefills it (in chunks
   when long) and samples the first token. The scheduler hands the finished request's KV to this side
   instead of freeing it.
4. The KV slots and then the metadata row (first token, its logprobs, cached tokens, room) are written into
   the decode's memory through the transfer engine (TRANSFERRING), polled every step.
5. SUCCESS or FAILED: TransferDone goes to the decode, the KV slots are released (into the prefix cache)
   and the one-token HTTP answer is emitted (with the error on failure).
Prefill first (vLLM's protocol, kv_transfer_params.do_remote_decode; BootstrapInfo.hold_kv): the request enters
the scheduler at once without a destination (WAITING_FOR_INPUT), is answered when computed, and its KV is held
(KV_HELD) for --kv-lease-duration; the decode's KVDestination for the room then starts step 4 as above (the
decode pulls: it names where, the prefill writes). A lease that runs out frees the KV; a later destination hears
TransferDone(ok=False) naming the lease.
Abort (client disconnect, /abort_request, AbortRoom from the decode) is honoured in every state, and every
state has a deadline: BOOTSTRAPPING SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT, WAITING_FOR_INPUT
SGLANG_DISAGGREGATION_WAITING_TIMEOUT, TRANSFERRING PDSERVE_TRANSFER_TIMEOUT (the write is abandoned). Whatever
ends a room whose destination arrived, the decode hears TransferDone with the destination's nonce: its word
that nothing more will be written there (the decode quarantines the destination until then).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, replace

from pdserve.config import EngineConfig
from pdserve.disagg.bootstrap import BootstrapServer, register_rank
from pdserve.disagg.common import DisaggLink, RoomState, kv_checksum, now
from pdserve.disagg.messages import AbortRoom, KVDestination, PeerRegister, TransferDone
from pdserve.disagg.metadata import MetaRow
from pdserve.disagg.peer_checks import destination_fits, layout_mismatch
from pdserve.disagg.rank_transfer import (
    AddPeer,
    DecodeLayout,
    PollWrites,
    Register,
    RemovePeer,
    StartWrite,
    encode_command,
)
from pdserve.disagg.transfer import AgentInfo, TransferState, WriteRun
from pdserve.engine.tp_worker import TensorRanksFailed
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateRequest, LoadReport, RequestOutput
from pdserve.engine.request import Request
from pdserve.envs import ENVS
from pdserve.model.loader import ResolvedModel

logger = logging.getLogger(__name__)

PEER_IDLE_TTL_S = 600.0  # a decode peer silent this long, with nothing in flight, is released
INJECTED_TRANSFER_FAILURE = "KV transfer failed: injected fault (PDSERVE_FAULT_TRANSFER_FAIL_P)"
# A prompt's last write starts after the step that computed it; the decode hears it landed at the next poll. With
# more work queued the next poll would come after the next step (~0.4 s for a 128-token chunk on one CPU core:
# a short prompt's TTFT doubled), so the loop polls a little longer first: until the writes started after this
# step landed, at most this share of the step's time and at most TAIL_WAIT_MAX_S.
TAIL_WAIT_STEP_SHARE = 0.1
TAIL_WAIT_MAX_S = 0.05


@dataclass
class DecodePeer:
    """A decode that sent PeerRegister."""

    ctrl_addr: str
    seen: float  # time of its latest message
    agent: AgentInfo | None = None  # its memory, once accepted and loaded into the transfer engine
    refused: str | None = None  # why its registration was refused


class PrefillEngine:

    def __init__(self, config: EngineConfig, resolved: ResolvedModel | None = None):
        self.engine = Engine(config, resolved)
        self.max_total_tokens, self.context_len = self.engine.max_total_tokens, self.engine.context_len
        self.kernel_plan = self.engine.kernel_plan
        self.link = DisaggLink(self.engine, config, "prefill", num_meta_rows=4 * config.max_running_requests + 16)
        self.engine.scheduler.kv_hold = self._start_transfer
        self.xfer = self.link.xfer  # this rank's writes; the other TP ranks follow through RankCall commands
        self._next_xfer_id = 1
        self._abandon: list[int] = []  # writes to stop, told to every rank at the next poll
        self.num_staged = 0  # transfers sent from a staged copy (prefill TP < decode TP)
        self.num_streamed_chunks = 0  # chunk writes sent while the prompt's next chunks computed
        self._faults = random.Random(ENVS.fault_seed) if ENVS.fault_transfer_fail_p > 0 else None  # tests only
        self.bootstrapping: dict[int, Request] = {}  # room -> request waiting for its destination
        self.destinations: dict[int, tuple[KVDestination, float]] = {}  # arrived before their request
        self.transferring: dict[str, Request] = {}  # rid -> request whose KV is being written
        self.peers: dict[str, DecodePeer] = {}  # decode agent name -> what it registered
        self.waiting_input: dict[int, Request] = {}  # room -> destination known, KV not computed yet
        self.held: dict[str, Request] = {}  # rid -> prefill first: answered, KV held for its decode (KV_HELD)
        self.num_held_total = 0  # prefill-first requests answered (their KV held for a decode)
        self.num_leases_expired = 0
        self._next_peer_sweep = 0.0
        self.room_rid: dict[int, str] = {}  # every live PD request
        # Rooms that failed before their decode's destination arrived: told when it does (else it would wait
        # for its waiting timeout). room -> (reason, time).
        self.failed_rooms: dict[int, tuple[str, float]] = {}
        # One bootstrap server per prefill instance: in its dp rank 0 engine; every rank of every dp group
        # registers there (TP ranks > 0 themselves, told by a RankCall).
        self.bootstrap = None
        if config.dp_rank == 0:
            self.bootstrap = BootstrapServer(config.host, config.bootstrap_port, config.auth_token).start()
        self.server_id = config.instance_id or f"{os.getpid()}-{self.link.agent_name}"  # new on every start
        register_rank(config.host, config.bootstrap_port, self.xfer.rank_info(self.link.ctrl.port, self.server_id),
                      config.auth_token)
        self.link.rank_call(encode_command(Register(config.host, config.bootstrap_port, self.link.ctrl.port,
                                                    self.server_id, config.auth_token)))

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
        return 0.0005 if self.transferring else 0.05

    def add_request(self, g: GenerateRequest) -> None:
        if g.bootstrap is None:
            raise ValueError("a prefill server needs bootstrap_room (and bootstrap_host/port) on every request")
        room = g.bootstrap.room
        if room in self.room_rid:
            raise ValueError(f"bootstrap_room {room} is already in use by another request")
        if g.rid in self.held or g.rid in self.transferring:
            raise ValueError(f"request id {g.rid!r} is in use: its KV is still held here for a decode")
        g = replace(g, sampling=g.sampling.with_max_new_tokens(1))
        self.engine.add_request(g)
        req = self.engine.requests[g.rid]
        if g.bootstrap.hold_kv:  # prefill first: computed now (no destination yet), held for the decode after
            req.disagg = RoomState(room, TransferState.WAITING_FOR_INPUT, now() + ENVS.disagg_waiting_timeout_s)
            self.waiting_input[room] = req
            self.room_rid[room] = g.rid
            return
        self.engine.scheduler.waiting.remove(req)  # enters the scheduler once its destination is known
        req.disagg = RoomState(room, TransferState.BOOTSTRAPPING, now() + ENVS.disagg_bootstrap_timeout_s)
        self.bootstrapping[room] = req
        self.room_rid[room] = g.rid
        if room in self.destinations:
            self._attach(req, self.destinations.pop(room)[0])

    def abort(self, rid: str, reason: str = "aborted", by_client: bool = True) -> RequestOutput | None:
        """by_client: the client gave up (the engine loop's AbortRequest), not a PD failure."""
        if rid in self.held:
            self._release_held(self.held.pop(rid), f"aborted: {reason}")
            return None  # answered already
        req = self.engine.requests.get(rid) or self.transferring.get(rid)
        if req is None:
            return None
        st: RoomState = req.disagg
        st.extra["client_abort"] = by_client
        if st.state is TransferState.TRANSFERRING:  # cannot free slots the backend is reading: finish later
            st.aborted, st.extra["not_a_failure"] = st.aborted or reason, True
            self._abandon_write(st)
            return None
        self.bootstrapping.pop(st.room, None)
        self.waiting_input.pop(st.room, None)
        if st.handle is None:  # else the decode hears it once the chunks already sent stopped (_drain)
            self._notify(st, TransferDone(st.room, ok=False, nonce=st.nonce, client_abort=by_client,
                                          error=f"prefill aborted the request: {reason}"))
        return self._finish_room(req, reason)

    def _abandon_write(self, st: RoomState) -> None:
        """Tell every rank's worker to stop this room's write at the next poll (once)."""
        if not st.extra.get("abandoned"):
            st.extra["abandoned"] = True
            self._abandon.append(st.handle)

    def step(self) -> list[RequestOutput]:
        outs = self._handle_control()
        outs += self._expire_bootstrapping()
        outs += self._expire_waiting_input()
        self._expire_held()
        step_start = now()
        for o in self.engine.step():
            req = self.transferring.get(o.rid)
            if req is not None:
                req.disagg.held_output = o  # emitted when the transfer ends
            else:
                if o.finish_reason is not None and o.rid not in self.held:
                    self._forget_rid(o.rid)
                outs.append(o)
        for rid, req in list(self.held.items()):  # prefill first: destinations that came while it computed
            early = self.destinations.pop(req.disagg.room, None)
            if early is not None:
                self._claim(req, early[0])
        self._stream_chunks()
        outs += self._poll_transfers()
        return outs + self._await_fresh_writes(step_start)

    def _await_fresh_writes(self, step_start: float) -> list[RequestOutput]:
        """Poll until the last writes started after the step that began at step_start landed (see
        TAIL_WAIT_STEP_SHARE), when another step would otherwise run first."""
        t = now()
        deadline = t + min(TAIL_WAIT_MAX_S, TAIL_WAIT_STEP_SHARE * (t - step_start))
        outs: list[RequestOutput] = []
        while self.engine.has_work and now() < deadline and any(
                r.disagg.extra.get("transfer_start", 0.0) >= step_start for r in self.transferring.values()):
            time.sleep(0.0005)
            outs += self._poll_transfers()
        return outs

    def load(self) -> LoadReport:
        r = self.engine.load()
        pd = replace(self.link.stats, num_prefill_prealloc_queue_reqs=len(self.bootstrapping),
                     num_prefill_inflight_queue_reqs=len(self.transferring))
        return replace(r, extra={**r.extra, "control_frames_dropped": sum(self.link.ctrl.dropped.values()),
                                 "kv_held_reqs": len(self.held), "kv_held_total": self.num_held_total,
                                 "kv_pending_reqs": len(self.held) + len(self.transferring),
                                 "kv_leases_expired": self.num_leases_expired,
                                 "kv_transfers_staged": self.num_staged,
                                 "kv_chunks_streamed": self.num_streamed_chunks},
                       stats=replace(r.stats, pd=pd) if r.stats is not None else None)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def close(self) -> None:
        if self.bootstrap is not None:
            self.bootstrap.stop()
        self.link.close()

    # ---- control messages ----------------------------------------------------------------------------
    def _handle_control(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        for msg in self.link.ctrl.recv_all():
            try:  # one message fails at most the peer or room it names, never the engine
                outs += self._on_message(msg)
            except TensorRanksFailed:
                raise  # the engine's TP group is gone: not this message's fault
            except Exception:  # noqa: BLE001
                logger.exception("control message %s failed", type(msg).__name__)
        self._release_idle_peers()
        return outs

    def _on_message(self, msg: object) -> list[RequestOutput]:
        if isinstance(msg, PeerRegister):
            self._register_peer(msg)
        elif isinstance(msg, KVDestination):
            peer = self.peers.get(msg.decode_agent)
            if peer is not None:
                peer.seen = now()
            req = self.bootstrapping.get(msg.room)
            held = self.held.get(self.room_rid.get(msg.room, ""))
            failed = self.failed_rooms.pop(msg.room, None) if req is None else None
            refused = peer.refused if peer is not None else None
            if held is not None:
                self._claim(held, msg)
            elif req is not None:
                self._attach(req, msg)  # checks the destination (and fails the room on a refused peer)
            elif refused is not None or failed is not None:
                self._reply(msg.decode_agent, TransferDone(msg.room, ok=False, nonce=msg.nonce,
                                                           error=refused or failed[0]))
            else:
                self.destinations[msg.room] = (msg, now())
        elif isinstance(msg, AbortRoom):
            dest = self.destinations.pop(msg.room, None)
            rid = self.room_rid.get(msg.room)
            if rid in self.held:  # prefill first: nothing written yet; free the KV and say so
                self._release_held(self.held.pop(rid), f"decode aborted: {msg.reason}")
                self._reply(msg.decode_agent, TransferDone(msg.room, ok=False, nonce=msg.nonce,
                                                           error="the decode aborted the room"))
                return []
            if rid is not None:
                out = self.abort(rid, f"decode aborted: {msg.reason}", by_client=False)  # tells it once safe
                return [] if out is None else [out]
            # Not a live request here: nothing will be written; say so, so the decode frees the destination.
            self._reply(msg.decode_agent, TransferDone(msg.room, ok=False, nonce=msg.nonce,
                                                       error="room not in flight on this prefill"))
            if dest is None:
                self.failed_rooms[msg.room] = (f"decode aborted: {msg.reason}", now())
        else:
            logger.warning("unexpected %s on a prefill's control socket", type(msg).__name__)
        return []

    def _register_peer(self, msg: PeerRegister) -> None:
        """A decode announces how to write into it (every TP rank's memory): checked against this engine's
        layout, then each of this server's TP ranks loads the decode ranks it sends heads to."""
        name = msg.agent.agent_name
        layout = DecodeLayout(name, msg.rank_agents or (msg.agent,), msg.num_kv_heads or self.link.num_kv_heads,
                              msg.head_bytes or self.link.head_bytes)
        reason = None
        if msg.agent.backend != self.link.transfer.name:
            reason = (f"decode {name} uses transfer backend {msg.agent.backend!r}, this prefill "
                      f"{self.link.transfer.name!r} (--disaggregation-transfer-backend must match)")
        elif msg.page_size != self.engine.config.page_size:
            reason = (f"decode {name} has --page-size {msg.page_size}, this prefill {self.engine.config.page_size} "
                      "(prefill and decode must use the same page size)")
        else:
            reason = layout_mismatch(self.link, self.xfer, name, layout, msg.agent)
        peer = self.peers[name] = DecodePeer(msg.ctrl_addr, now(), refused=reason)
        if reason is not None:
            logger.warning("peer refused: %s", reason)
            return
        self.xfer.add_peer(layout, extra_ranks=(0,))  # may raise (bad metadata): the peer stays unusable
        self.link.rank_call(encode_command(AddPeer(layout)))
        peer.agent = msg.agent

    def _release_idle_peers(self) -> None:
        t = now()
        if t < self._next_peer_sweep:
            return
        self._next_peer_sweep = t + 10.0
        busy = {r.disagg.peer for r in self._live_requests()}
        for name, peer in list(self.peers.items()):
            if t - peer.seen > PEER_IDLE_TTL_S and name not in busy:
                logger.info("releasing idle decode peer %s", name)
                del self.peers[name]
                if all(p.ctrl_addr != peer.ctrl_addr for p in self.peers.values()):
                    self.link.ctrl.forget(peer.ctrl_addr)
                if peer.agent is not None:
                    self.xfer.remove_peer(name)
                    self.link.rank_call(encode_command(RemovePeer(name)))

    def _live_requests(self) -> list[Request]:
        reqs = (self.engine.requests.get(rid) for rid in self.room_rid.values())
        return [r for r in reqs if r is not None and r.disagg is not None] + list(self.transferring.values())

    def _attach(self, req: Request, dest: KVDestination) -> None:
        st: RoomState = req.disagg
        st.extra["bootstrap_s"] = now() - req.arrival_time
        self.bootstrapping.pop(st.room, None)
        err = self._take_destination(req, dest)
        if err:  # failed by this step's expiry pass
            self._notify(st, TransferDone(st.room, ok=False, nonce=st.nonce, error=err))
            st.extra["fail_now"], st.deadline = err, 0.0
            self.bootstrapping[st.room] = req
            return
        st.deadline = now() + ENVS.disagg_waiting_timeout_s
        self.waiting_input[st.room] = req
        self.engine.scheduler.add(req)

    def _take_destination(self, req: Request, dest: KVDestination) -> str | None:
        """Check a decode's destination for the room against this request and the decode's registered memory and
        record it (WAITING_FOR_INPUT); why it cannot take the KV (None: it can)."""
        st: RoomState = req.disagg
        peer = self.peers.get(dest.decode_agent)
        err = peer.refused if peer is not None else None
        agent = peer.agent if peer is not None else None
        if err is None and agent is None:
            err = "decode peer is not registered with this prefill"
        elif err is None and dest.prompt_len != len(req.prompt_ids):
            err = f"prompt length mismatch (prefill {len(req.prompt_ids)} tokens, decode {dest.prompt_len})"
        elif err is None and dest.dst_pages and dest.page_size != self.engine.config.page_size:
            err = (f"the destination is in pages of {dest.page_size} tokens, this prefill uses --page-size "
                   f"{self.engine.config.page_size} (prefill and decode must use the same page size)")
        slots = dest.slots() if err is None else ()
        if err is None and len(slots) != dest.prompt_len:
            err = f"the destination has {len(slots)} slots for a {dest.prompt_len}-token prompt"
        elif err is None and not destination_fits(self.link, agent, dest, slots):
            err = "the destination lies outside the decode's registered memory"
        st.peer, st.nonce = dest.decode_agent, dest.nonce
        if err is None:
            st.dst_slots, st.meta_row = slots, dest.meta_row
            st.extra["dst_stage"] = dest.stage_start
            st.state = TransferState.WAITING_FOR_INPUT
        return err

    # ---- prefill first (vLLM's protocol) ------------------------------------------------------------------
    def _hold(self, req: Request) -> bool:
        """Finish hook of a prefill-first request: it is answered now; its KV is kept for the decode (True)."""
        st: RoomState = req.disagg
        self.waiting_input.pop(st.room, None)
        st.state, st.deadline = TransferState.KV_HELD, now() + self.engine.config.kv_lease_s
        st.extra["answered"] = True  # the KV's later write emits nothing
        if req.pending_logprobs:  # the answer takes them with it; the metadata row is written at the claim
            st.extra["first_logprob"] = req.pending_logprobs[0]
        self.held[req.rid] = req
        self.num_held_total += 1
        return True

    def _claim(self, req: Request, dest: KVDestination) -> None:
        """The decode's destination for a held room arrived: write the KV there (the decode pulls), or tell it why
        not and free the KV."""
        del self.held[req.rid]
        st: RoomState = req.disagg
        try:
            err = self._take_destination(req, dest)
            if err is None:
                if self._start_transfer(req):
                    self.failed_rooms[st.room] = ("the room's KV was claimed already", now())  # a second claim
                    return
                self._release_held(req, req.error or "the KV transfer could not start")  # _refuse told the decode
                return
        except TensorRanksFailed:
            raise
        except Exception as e:  # noqa: BLE001 - one claim fails, never the engine
            logger.exception("room %d: claim failed", st.room)
            err = f"the prefill could not start the KV transfer: {e}"
        self.link.stats.count_failure(in_bootstrap=False)
        self._notify(st, TransferDone(st.room, ok=False, nonce=st.nonce, error=err))
        self._release_held(req, err)

    def _expire_held(self) -> None:
        t = now()
        for rid, req in list(self.held.items()):
            st: RoomState = req.disagg
            if t >= st.deadline:
                del self.held[rid]
                self.num_leases_expired += 1
                reason = (f"the prefill's KV lease for room {st.room} ran out: no decode claimed it within "
                          f"{self.engine.config.kv_lease_s:g} s (--kv-lease-duration)")
                self._release_held(req, reason)

    def _release_held(self, req: Request, reason: str) -> None:
        st: RoomState = req.disagg
        logger.info("room %d: held KV freed: %s", st.room, reason)
        st.state = TransferState.FAILED
        self.room_rid.pop(st.room, None)
        self.failed_rooms[st.room] = (reason, now())  # a later destination for it hears why at once
        self.engine.scheduler.kv.release(req)

    def _expire_waiting_input(self) -> list[RequestOutput]:
        """WAITING_FOR_INPUT past its deadline (the prefill could not compute it in time): abort it."""
        t = now()
        outs = []
        for room, req in list(self.waiting_input.items()):
            if req.disagg.state is not TransferState.WAITING_FOR_INPUT or req.finished:
                del self.waiting_input[room]
            elif t >= req.disagg.deadline:
                self.link.stats.count_failure(in_bootstrap=False)
                out = self.abort(req.rid, by_client=False, reason=f"the prefill did not compute room {room} within "
                                          f"{ENVS.disagg_waiting_timeout_s:.0f} s "
                                          "(SGLANG_DISAGGREGATION_WAITING_TIMEOUT)")
                if out is not None:
                    outs.append(out)
        return outs

    def _expire_bootstrapping(self) -> list[RequestOutput]:
        outs = []
        t = now()
        for room, req in list(self.bootstrapping.items()):
            st: RoomState = req.disagg
            if t >= st.deadline:
                reason = st.extra.get("fail_now") or (
                    f"bootstrap timeout: no decode server claimed room {room} within "
                    f"{ENVS.disagg_bootstrap_timeout_s:.0f} s (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)")
                del self.bootstrapping[room]
                self.link.stats.count_failure(in_bootstrap=True)
                outs.append(self._finish_room(req, reason))
        for room, (_, t0) in list(self.destinations.items()):
            if t - t0 > ENVS.disagg_bootstrap_timeout_s:
                del self.destinations[room]
        for room, (_, t0) in list(self.failed_rooms.items()):
            if t - t0 > ENVS.disagg_bootstrap_timeout_s:
                del self.failed_rooms[room]
        return outs

    # ---- transfer --------------------------------------------------------------------------------------
    def _start_transfer(self, req: Request) -> bool:
        """Scheduler hook on finish: keep the KV of a completed prefill and start writing it to the decode."""
        st: RoomState | None = req.disagg
        if st is None:
            return False
        n = len(req.prompt_ids)
        if (req.finish_reason == "abort" or st.state is not TransferState.WAITING_FOR_INPUT
                or req.num_computed_tokens < n):
            return self._drain(req)
        if st.peer is None:  # prefill first: no destination yet
            return self._hold(req)
        if len(st.dst_slots) != n:
            return self._drain(req)
        row = self.link.meta.alloc()
        if row is None:
            return self._refuse(req, "no free metadata row on the prefill")
        lp = req.pending_logprobs[0] if req.pending_logprobs else st.extra.get("first_logprob")
        self.link.meta.write(row, MetaRow(st.room, st.nonce, req.output_ids[0], req.num_cached_tokens,
                                          lp.logprob if lp else 0.0, lp.top if lp else []))
        st.extra["local_row"] = row
        peer = self.xfer.peers.get(st.peer or "")
        if (self.engine.config.kv_checksum and self.link.moves_data and peer is not None
                and len(peer.layout.agents) == self.engine.config.tp_size):  # the decode's rank 0 holds what ours does
            st.extra["kv_checksum"] = kv_checksum(self.engine, req.slots[:n])
        rb = self.link.meta.row_bytes
        meta_run = (0, [WriteRun(self.link.meta_region, row * rb, st.meta_row * rb, rb)])  # to decode rank 0
        streamed = st.handle is not None  # its first chunks are on their way: the tail joins that write
        sent = st.extra.get("num_streamed", 0)
        st.extra["tail_tokens"] = n - sent  # what this last write moves (the figures of /metrics)
        xfer_id = st.handle if streamed else self._new_xfer_id()
        stage_start = None if streamed else self._lend_stage(st, n)
        try:
            self._start_write(st, xfer_id, req.slots[sent:n], list(st.dst_slots[sent:n]), streamed, meta_run,
                              stage_start)
            st.handle = xfer_id
            if self._faults is not None and self._faults.random() < ENVS.fault_transfer_fail_p:
                self.xfer.fail(xfer_id, st.peer or "", INJECTED_TRANSFER_FAILURE)
                st.aborted = INJECTED_TRANSFER_FAILURE  # the poll fails the room with this error
            st.state = TransferState.TRANSFERRING
            st.deadline = now() + ENVS.disagg_transfer_timeout_s
            st.extra["transfer_start"] = now()
            self.waiting_input.pop(st.room, None)
        except TensorRanksFailed:
            raise
        except Exception as e:  # backend refused: fail the room, release normally (after its chunks stopped)
            logger.exception("transfer start failed")
            if not streamed:
                self.xfer.release(xfer_id)
            self._return_stage(st)
            self.link.meta.free(row)
            st.extra.pop("local_row", None)
            return self._refuse(req, f"KV transfer failed to start: {e}")
        self.transferring[req.rid] = req
        return True

    def _start_write(self, st: RoomState, xfer_id: int, src_slots: list[int], dst_slots: list[int], append: bool,
                     meta_run: tuple[int, list[WriteRun]] | None = None, stage_start: int | None = None) -> None:
        """Queue this rank's part of a room's write and tell the other TP ranks theirs, under one id (append: more
        of the room's write)."""
        dst_stage = st.extra.get("dst_stage")
        self.xfer.start(xfer_id, st.peer, src_slots, dst_slots, extra=meta_run, stage_start=stage_start,
                        dst_stage_start=dst_stage, append=append)
        self.link.rank_call(encode_command(StartWrite(xfer_id, st.peer, src_slots, dst_slots, stage_start, dst_stage,
                                                      append=append)))

    def _new_xfer_id(self) -> int:
        xfer_id, self._next_xfer_id = self._next_xfer_id, self._next_xfer_id + 1
        return xfer_id

    # ---- KV streamed chunk by chunk -------------------------------------------------------------------------
    def _stream_chunks(self) -> None:
        """After a step: send the chunks of prompts computed so far (not their last: the finish hook sends it with
        the metadata row), so transfers overlap the next chunks' compute. All writes of a room share one id; the
        decode starts only on the metadata row, i.e. after every chunk landed. Not with staging (TP mismatch
        with a staged copy): those rooms go whole at the end."""
        for req in self.waiting_input.values():
            st: RoomState = req.disagg
            computed = min(req.num_computed_tokens, len(req.prompt_ids) - 1)
            sent = st.extra.get("num_streamed", 0)
            if (req.finished or st.state is not TransferState.WAITING_FOR_INPUT or computed <= sent
                    or not self._can_stream(st)):
                continue
            streamed = st.handle is not None
            xfer_id = st.handle if streamed else self._new_xfer_id()
            try:
                self._start_write(st, xfer_id, req.slots[sent:computed], list(st.dst_slots[sent:computed]), streamed)
            except TensorRanksFailed:
                raise
            except Exception:  # noqa: BLE001 - the room's write fails; the poll fails the room at the end
                logger.exception("room %d: a chunk's write failed to start", st.room)
                self.xfer.fail(xfer_id, st.peer or "", "a chunk's write failed to start")
                st.extra["stream_failed"] = True
            st.handle, st.extra["num_streamed"] = xfer_id, computed
            st.extra.setdefault("timeline", []).append((now(), computed))
            self.num_streamed_chunks += 1

    def _can_stream(self, st: RoomState) -> bool:
        peer = self.xfer.peers.get(st.peer or "")
        return (ENVS.kv_chunk_streaming and peer is not None and st.extra.get("dst_stage") is None
                and not st.extra.get("stream_failed") and not self.xfer.needs_staging(peer.layout))

    def _drain(self, req: Request) -> bool:
        """Finish hook of a room that ends before its whole write started: with chunks already on their way,
        keep its KV (True) until every rank's worker stopped reading it; the poll then answers the decode and
        frees the KV (the client was answered already). Without, nothing holds the KV (False)."""
        st: RoomState = req.disagg
        if st.state is TransferState.TRANSFERRING:
            return False
        if st.handle is None:
            if st.state is TransferState.WAITING_FOR_INPUT:  # ended here untold (e.g. a forward error): tell it
                self.waiting_input.pop(st.room, None)
                st.state = TransferState.FAILED
                self._notify(st, TransferDone(st.room, ok=False, nonce=st.nonce,
                                              error=req.error or "the prefill failed the request"))
            return False
        self.waiting_input.pop(st.room, None)
        st.state = TransferState.TRANSFERRING
        st.aborted = st.aborted or req.error or "aborted"
        st.extra["not_a_failure"] = True  # counted where it failed, or a client's abort
        st.extra["answered"] = True
        st.deadline = now() + ENVS.disagg_transfer_timeout_s
        self._abandon_write(st)
        self.transferring[req.rid] = req
        # Live again for the decode's AbortRoom (it must not hear "not in flight" while a write may still land).
        self.room_rid[st.room] = req.rid
        return True

    def _poll_transfers(self) -> list[RequestOutput]:
        """One poll round over every TP rank's writes (their MIN is the state); finish what ended."""
        if not self.transferring and not self._abandon:
            return []
        t = now()
        for req in self.transferring.values():
            st: RoomState = req.disagg
            if t >= st.deadline and not st.extra.get("abandoned"):  # a hung peer: every rank's worker gives up
                st.aborted = st.aborted or (f"KV transfer to the decode did not finish within "
                                            f"{ENVS.disagg_transfer_timeout_s:.0f} s (PDSERVE_TRANSFER_TIMEOUT)")
                self._abandon_write(st)
        reqs = list(self.transferring.values())
        ids = [r.disagg.handle for r in reqs]
        abandon, self._abandon = self._abandon, []
        self.link.rank_call(encode_command(PollWrites(abandon, ids, [])))
        agreed = self.xfer.poll(abandon, ids, [], self.link.all_reduce_min())
        done = []
        for req, (state, failed) in zip(reqs, agreed):
            st = req.disagg
            if state is not TransferState.TRANSFERRING:
                done.append((req, state))
            elif failed and not st.aborted:  # a rank failed while another still writes: stop it everywhere
                st.aborted = "KV transfer to the decode server failed"
                self._abandon_write(st)
        if done:  # forget them on every rank (the KV stays ours until every rank's worker stopped reading)
            released = [req.disagg.handle for req, _ in done]
            self.link.rank_call(encode_command(PollWrites([], [], released)))
            self.xfer.poll([], [], released)
        outs = []
        for req, state in done:
            st: RoomState = req.disagg
            del self.transferring[req.rid]
            self._return_stage(st)
            row = st.extra.pop("local_row", None)
            if state is TransferState.SUCCESS and not st.aborted:
                st.state = TransferState.SUCCESS
                transfer_s = now() - st.extra["transfer_start"]  # the last write's (the chunks overlapped compute)
                self.link.stats.record_transfer(st.extra["tail_tokens"] * self.link.kv_bytes_per_token, transfer_s,
                                                st.extra.get("bootstrap_s", 0.0))
                if "timeline" in st.extra:  # streamed: when each chunk left, when the last was computed, landed
                    _log_timeline(st, len(st.dst_slots))
                meta = None if self.link.moves_data else self.link.meta.row_view(row)
                self._notify(st, TransferDone(st.room, ok=True, nonce=st.nonce, meta_bytes=meta,
                                              transfer_ms=transfer_s * 1e3, kv_checksum=st.extra.get("kv_checksum")))
                self.link.meta.free(row)
                self.engine.scheduler.kv.release(req)
                self.room_rid.pop(st.room, None)
                if not st.extra.get("answered"):  # prefill first: answered when it was computed
                    outs.append(st.held_output or self.engine.make_output(req))
            else:
                if row is not None:
                    self.link.meta.free(row)
                reason = st.aborted or "KV transfer to the decode server failed"
                not_a_failure = bool(st.extra.get("not_a_failure"))
                if not not_a_failure:
                    self.link.stats.count_failure(in_bootstrap=False)
                self._notify(st, TransferDone(st.room, ok=False, nonce=st.nonce, error=reason,
                                              client_abort=bool(st.extra.get("client_abort"))))
                self.engine.scheduler.kv.release(req)
                if st.extra.get("answered") and st.held_output is None:  # drained: the client was answered
                    st.state = TransferState.FAILED
                    self.room_rid.pop(st.room, None)
                else:
                    outs.append(self._finish_room(req, reason))
        return outs

    def _lend_stage(self, st: RoomState, num_tokens: int) -> int | None:
        """Prefill TP < decode TP: n free contiguous slots of the pool (the same on every rank) to stage the heads
        each decode rank takes as one range (rank_transfer.stage_kv), held until every rank's write ended. None:
        no staging needed, or no contiguous room free (the heads then go slot by slot)."""
        peer = self.xfer.peers.get(st.peer or "")
        if peer is None or not self.xfer.needs_staging(peer.layout):
            return None
        got = self.engine.scheduler.kv.lend_run(num_tokens)
        if not got:
            return None
        st.extra["stage"] = got
        self.num_staged += 1
        return got[0]

    def _return_stage(self, st: RoomState) -> None:
        got = st.extra.pop("stage", None)
        if got is not None:
            self.engine.scheduler.kv.free_detached(got)

    def _refuse(self, req: Request, reason: str) -> bool:
        """Inside the scheduler's finish: turn the completed prefill into an error; the scheduler frees KV."""
        st: RoomState = req.disagg
        self.link.stats.count_failure(in_bootstrap=False)
        req.finish_reason, req.error = "abort", reason
        if st.handle is not None:  # chunks on their way: answer the decode once they stopped
            return self._drain(req)
        st.state = TransferState.FAILED
        self._notify(st, TransferDone(st.room, ok=False, nonce=st.nonce, error=reason))
        return False

    # ---- helpers ---------------------------------------------------------------------------------------
    def _notify(self, st: RoomState, msg: TransferDone) -> None:
        self._reply(st.peer or "", msg)

    def _reply(self, decode_agent: str, msg: TransferDone) -> None:
        peer = self.peers.get(decode_agent)
        if peer is not None:
            self.link.ctrl.send(peer.ctrl_addr, msg)

    def _finish_room(self, req: Request, reason: str) -> RequestOutput:
        st: RoomState = req.disagg
        st.state = TransferState.FAILED
        self.room_rid.pop(st.room, None)
        if st.peer is None:  # the decode has not sent its destination yet: answer it when it does
            self.failed_rooms[st.room] = (f"prefill failed the request: {reason}", now())
        if st.held_output is not None:
            out = st.held_output
            out.finish_reason, out.error = "abort", reason
            return out
        return self.link.fail(req, reason)

    def _forget_rid(self, rid: str) -> None:
        for room, r in list(self.room_rid.items()):
            if r == rid:
                del self.room_rid[room]


def _log_timeline(st: RoomState, num_tokens: int) -> None:
    """One line per streamed room (benchmarks/pd_chunk_streaming.py draws it): ms from the first chunk's send to
    each chunk's send (with the tokens computed by then), to the last chunk's computation, and to all KV landed."""
    t0 = st.extra["timeline"][0][0]
    chunks = [[round((t - t0) * 1e3, 2), tokens] for t, tokens in st.extra["timeline"]]
    logger.debug("kv stream timeline %s", json.dumps({
        "room": st.room, "num_tokens": num_tokens, "chunks": chunks,
        "last_computed_ms": round((st.extra["transfer_start"] - t0) * 1e3, 2),
        "landed_ms": round((now() - t0) * 1e3, 2)}))
