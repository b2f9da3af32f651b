"""The KV transfer work of one prefill TP rank: its transfer engine and queues, the decode ranks it writes to,
and the writes of each room (its heads of the prompt's KV, sliced for the decode's TP layout).

Rank 0 (pdserve/disagg/prefill.py) runs the PD state machine and tells the other ranks what to do through the
engine's TP command stream (RankCall commands, msgspec; pdserve/engine/tp_worker.py): add a decode peer, start a
room's write, poll / release writes. Every rank keeps the same transfer ids. States agree across ranks by a MIN
all-reduce of their codes (FAILED < TRANSFERRING < SUCCESS, as SGLang's poll agreement): a rank that fails fails
the room on all.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Annotated, Union

import msgspec
import torch

from pdserve.config import EngineConfig
from pdserve.disagg.kv_slicing import HeadSlice, head_slices, slice_write_runs
from pdserve.disagg.transfer import AgentInfo, MemRegion, TransferState, WriteRun, create_transfer_engine, slot_runs
from pdserve.disagg.messages import RankInfo
from pdserve.disagg.transfer_queues import QueuedWrite, TransferQueues
from pdserve.envs import ENVS
from pdserve.model.tp_layout import num_local_kv_heads

logger = logging.getLogger(__name__)

STATE_CODE = {TransferState.FAILED: 0, TransferState.TRANSFERRING: 1, TransferState.SUCCESS: 2}
CODE_STATE = {v: k for k, v in STATE_CODE.items()}


class DecodeLayout(msgspec.Struct, frozen=True):
    """A decode server's TP layout as a prefill rank needs it."""

    key: str  # the decode's rank 0 agent name (the peer's identity)
    agents: tuple[AgentInfo, ...]  # one per decode TP rank
    num_kv_heads: int  # total, the model's
    head_bytes: int


class AddPeer(msgspec.Struct, tag=True):
    layout: DecodeLayout


class RemovePeer(msgspec.Struct, tag=True):
    key: str


class StartWrite(msgspec.Struct, tag=True):
    xfer_id: int
    key: str  # decode peer
    src_slots: list[int]
    dst_slots: list[int]
    stage_start: int | None = None  # first of len(src_slots) free contiguous slots lent for a staged copy
    dst_stage_start: int | None = None  # the decode's lent slots (KVDestination.stage_start)
    append: bool = False  # more of the same room's write (a prompt's KV streamed chunk by chunk)


class Unstage(msgspec.Struct, tag=True):
    """Decode ranks: regroup a room's staged KV (written by prefill ranks of a larger TP) into its slots."""

    dst_slots: list[int]
    stage_start: int
    src_heads: int  # heads per prefill rank's slot (the group size)


class PollWrites(msgspec.Struct, tag=True):
    abandon_ids: list[int]  # stop these writes (past their deadline, or aborted)
    xfer_ids: list[int]  # agree on these (MIN all-reduce)
    release_ids: list[int]  # then forget these (finished)


class Register(msgspec.Struct, tag=True):
    """Register this rank at the prefill instance's bootstrap server."""

    bootstrap_host: str
    bootstrap_port: int
    rank_port: int  # rank 0's control port (the decode's control peer)
    server_id: str
    auth_token: Annotated[str, msgspec.Meta(max_length=4096)] | None


RankCommand = Union[AddPeer, RemovePeer, StartWrite, PollWrites, Register, Unstage]
encode_command = msgspec.msgpack.Encoder().encode
_decode_command = msgspec.msgpack.Decoder(RankCommand).decode


@dataclass
class _Peer:
    layout: DecodeLayout
    added: list[str]  # agent names loaded into this rank's transfer engine


class RankTransfer:
    """This rank's transfer engine over its KV regions (+ the metadata rows on rank 0)."""

    def __init__(self, config: EngineConfig, rank: int, kv, num_kv_heads: int, meta: MemRegion | None = None):
        """kv: this rank's KVCache (per layer K and V pools [slots, local heads, head_dim]); num_kv_heads: the
        model's total."""
        regions = [MemRegion(t.data_ptr(), t.numel() * t.element_size(), t[0].numel() * t.element_size())
                   for k, v in zip(kv.k, kv.v) for t in (k, v)]
        self.num_kv_regions = len(regions)
        self.item_bytes = regions[0].item_bytes
        self.head_bytes = kv.k[0].shape[2] * kv.k[0].element_size()
        self.kv_dtype = str(kv.k[0].dtype).removeprefix("torch.")
        if meta is not None:
            regions.append(meta)
        self.regions = regions
        self.pools = [t for k, v in zip(kv.k, kv.v) for t in (k, v)]  # region order
        self.config, self.rank, self.tp_size, self.num_kv_heads = config, rank, config.tp_size, num_kv_heads
        self.agent_name = f"{config.disaggregation_mode}-{uuid.uuid4().hex[:12]}-tp{rank}"
        self.transfer = create_transfer_engine(config.transfer_backend, self.agent_name, config.host, regions,
                                               config.ib_device)
        self.queues = TransferQueues(self.transfer, ENVS.disagg_queue_size, ENVS.disagg_thread_pool_size)
        self.peers: dict[str, _Peer] = {}
        self.writes: dict[int, list[QueuedWrite]] = {}

    def rank_info(self, rank_port: int, server_id: str) -> RankInfo:
        """What this rank registers at its prefill instance's bootstrap server (SGLang's PUT /route fields)."""
        c = self.config
        return RankInfo(attn_tp_size=c.tp_size, attn_tp_rank=self.rank, attn_dp_size=c.dp_size,
                        attn_dp_rank=c.dp_rank, rank_ip=c.host, rank_port=rank_port, page_size=c.page_size,
                        kv_cache_dtype=self.kv_dtype, backend=c.transfer_backend, agent_name=self.agent_name,
                        num_regions=self.num_kv_regions, num_kv_heads=self.num_kv_heads,
                        head_bytes=self.head_bytes, item_bytes=self.item_bytes, server_id=server_id)

    def local_info(self) -> AgentInfo:
        return self.transfer.local_info()

    # ---- peers -------------------------------------------------------------------------------------------
    def decode_ranks(self, layout: DecodeLayout) -> list[int]:
        """Decode ranks this rank writes KV heads to."""
        slices = head_slices(self.num_kv_heads, self.tp_size, len(layout.agents))
        return sorted({s.decode_rank for s in slices if s.prefill_rank == self.rank})

    def add_peer(self, layout: DecodeLayout, extra_ranks: tuple[int, ...] = ()) -> None:
        """Load the agents of the decode ranks this rank writes to (rank 0 also its metadata target)."""
        old = self.peers.get(layout.key)
        if old is not None and old.layout == layout:
            return  # re-registered unchanged (e.g. after a heartbeat blip): writes in flight keep their agents
        if old is not None:
            del self.peers[layout.key]
            self._drop(old)
        peer = _Peer(layout, [])
        self.peers[layout.key] = peer
        for d in sorted(set(self.decode_ranks(layout)) | set(extra_ranks)):
            self.transfer.add_peer(layout.agents[d])
            peer.added.append(layout.agents[d].agent_name)

    def remove_peer(self, key: str) -> None:
        peer = self.peers.pop(key, None)
        if peer is not None:
            self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        for name in peer.added:
            self.transfer.remove_peer(name)

    # ---- writes ------------------------------------------------------------------------------------------
    def kv_runs(self, layout: DecodeLayout, src_slots: list[int], dst_slots: list[int],
                stage_start: int | None = None, dst_stage_start: int | None = None) -> list[tuple[int, list[WriteRun]]]:
        """(decode rank, runs) for every decode rank this rank sends heads to. stage_start: first of len(src_slots)
        free contiguous slots of this pool holding the staged copy (stage_kv), used by slices that are part of a
        source slot and whole destination slots. dst_stage_start: the decode's lent slots, for slices that are
        whole source slots and part of a destination slot (written grouped by head offset, see unstage)."""
        out = []
        num_slots = len(src_slots)
        for hs in head_slices(self.num_kv_heads, self.tp_size, len(layout.agents)):
            if hs.prefill_rank != self.rank:
                continue
            dst_item = layout.agents[hs.decode_rank].regions[0].item_bytes
            if stage_start is not None and stageable(hs, self.item_bytes, dst_item, self.head_bytes):
                group_start = stage_start * self.item_bytes + hs.src_head_offset * num_slots * self.head_bytes
                runs = [(region, group_start + s * dst_item, d * dst_item, count * dst_item)
                        for region in range(self.num_kv_regions)
                        for s, d, count in slot_runs(list(range(num_slots)), list(dst_slots))]
            elif dst_stage_start is not None and stageable(hs, dst_item, self.item_bytes, self.head_bytes,
                                                           dst_side=True):
                group_start = dst_stage_start * dst_item + hs.dst_head_offset * num_slots * self.head_bytes
                src_item = self.item_bytes
                runs = [(region, s * src_item, group_start + i * src_item, count * src_item)
                        for region in range(self.num_kv_regions)
                        for s, i, count in slot_runs(list(src_slots), list(range(num_slots)))]
            else:
                runs = slice_write_runs(hs, self.item_bytes, dst_item, self.head_bytes, self.num_kv_regions,
                                        src_slots, dst_slots)
            out.append((hs.decode_rank, [WriteRun(*r) for r in runs]))
        return out

    def needs_staging(self, layout: DecodeLayout) -> bool:
        """Whether this rank sends part of each source slot to whole destination slots (prefill TP < decode TP):
        then a staged copy turns one run per slot into one run per contiguous destination range."""
        return any(hs.prefill_rank == self.rank and stageable(hs, self.item_bytes, layout.agents[hs.decode_rank]
                                                              .regions[0].item_bytes, self.head_bytes)
                   for hs in head_slices(self.num_kv_heads, self.tp_size, len(layout.agents)))

    def stage_kv(self, src_slots: list[int], stage_start: int, heads_per_group: int) -> None:
        """Copy src_slots' KV into slots [stage_start, stage_start + n) of every region, regrouped as
        [local_heads / heads_per_group, n, heads_per_group, head_dim]: each destination rank's heads of all n tokens
        become one contiguous range, token-major as the destination holds them."""
        num_slots = len(src_slots)
        index = torch.tensor(src_slots, dtype=torch.long, device=self.pools[0].device)
        for pool in self.pools:  # [slots, local_heads, head_dim]
            x = pool.index_select(0, index)  # [n, L, D]
            _, num_local, head_dim = x.shape
            grouped = x.view(num_slots, num_local // heads_per_group, heads_per_group, head_dim).transpose(0, 1)
            pool[stage_start : stage_start + num_slots].copy_(grouped.reshape(num_slots, num_local, head_dim))
        _sync(self.pools[0])  # the backend reads this memory directly, outside the device's stream

    def unstage(self, dst_slots: list[int], stage_start: int, src_heads: int) -> None:
        """Decode rank: slots [stage_start, +n) hold [local_heads / src_heads, n, src_heads, head_dim] (each prefill
        rank's whole slots, by head offset); put them token-major into dst_slots."""
        num_slots = len(dst_slots)
        index = torch.tensor(dst_slots, dtype=torch.long, device=self.pools[0].device)
        for pool in self.pools:  # [slots, local_heads, head_dim]
            _, num_local, head_dim = pool.shape
            staged = pool[stage_start : stage_start + num_slots].reshape(num_local // src_heads, num_slots, src_heads,
                                                                         head_dim)
            regrouped = staged.transpose(0, 1).reshape(num_slots, num_local, head_dim).clone()  # may be a view
            pool.index_copy_(0, index, regrouped)
        _sync(self.pools[0])  # the lent slots are free again once this returns

    def start(self, xfer_id: int, key: str, src_slots: list[int], dst_slots: list[int],
              extra: tuple[int, list[WriteRun]] | None = None, stage_start: int | None = None,
              dst_stage_start: int | None = None, append: bool = False) -> None:
        """Queue this rank's writes of a room (extra: rank 0's metadata row, to one decode rank). append: more
        writes under the same id (its state is then that of all of them)."""
        peer = self.peers.get(key)
        jobs: list[QueuedWrite] = []
        if peer is None:  # never registered here: this rank fails the room (the poll agreement fails it on all)
            self.fail(xfer_id, key, "decode peer unknown on this rank")
            return
        if stage_start is not None:
            if self.needs_staging(peer.layout):
                dst_heads = num_local_kv_heads(self.num_kv_heads, len(peer.layout.agents))
                self.stage_kv(src_slots, stage_start, dst_heads)
            else:
                stage_start = None
        _sync(self.pools[0])  # the forward's KV writes must be done: the backend reads the pool outside the stream
        per_rank = dict(self.kv_runs(peer.layout, src_slots, dst_slots, stage_start, dst_stage_start))
        if extra is not None:
            per_rank.setdefault(extra[0], []).extend(extra[1])
        for d, runs in per_rank.items():
            jobs.append(self.queues.write(peer.layout.agents[d].agent_name, runs))
        if append:
            self.writes.setdefault(xfer_id, []).extend(jobs)
        else:
            self.writes[xfer_id] = jobs

    def fail(self, xfer_id: int, key: str, error: str) -> None:
        """Record this rank's write of a room as failed (what it queued already is abandoned)."""
        self.abandon(xfer_id)
        self.writes.setdefault(xfer_id, []).append(
            QueuedWrite(key, [], 0, state=TransferState.FAILED, error=error))

    def state(self, xfer_id: int) -> tuple[TransferState, bool]:
        """This rank's (state, still in flight) of a write: FAILED as soon as one of its writes failed (the others
        are abandoned then), but in flight until every one has stopped touching the KV."""
        jobs = self.writes.get(xfer_id)
        if jobs is None:
            return TransferState.FAILED, False
        failed = any(j.state is TransferState.FAILED for j in jobs)
        in_flight = any(j.state is TransferState.TRANSFERRING for j in jobs)
        if failed and in_flight:
            for job in jobs:
                self.queues.release(job)  # stop the rest: the room fails anyway
        return (TransferState.FAILED if failed else TransferState.TRANSFERRING if in_flight
                else TransferState.SUCCESS), in_flight

    def abandon(self, xfer_id: int) -> None:
        """Stop a write; its state turns FAILED once the backend stopped reading this rank's KV."""
        for job in self.writes.get(xfer_id, []):
            self.queues.release(job)

    def release(self, xfer_id: int) -> None:
        for job in self.writes.pop(xfer_id, []):
            self.queues.release(job)

    def poll(self, abandon_ids: list[int], xfer_ids: list[int], release_ids: list[int],
             all_reduce_min=None) -> list[tuple[TransferState, bool]]:
        """One poll round (every rank runs it with the same ids): per write, the ranks' agreed (state, failed
        somewhere): TRANSFERRING while any rank's write is still in flight, then FAILED if any rank failed, else
        SUCCESS. A write that failed somewhere but is still in flight elsewhere should be abandoned everywhere."""
        for i in abandon_ids:
            self.abandon(i)
        agreed = agree([self.state(i) for i in xfer_ids], all_reduce_min)
        for i in release_ids:
            self.release(i)
        return agreed

    def close(self) -> None:
        self.queues.close()
        self.transfer.close()


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def stageable(hs: HeadSlice, src_item_bytes: int, dst_item_bytes: int, head_bytes: int, dst_side: bool = False) -> bool:
    """A slice that is part of each source slot and fills each destination slot (staged by the prefill); with
    dst_side, the arguments swapped: one that fills each source slot and is part of each destination slot
    (staged by the decode; call it as stageable(hs, dst_item, src_item, ...))."""
    offset = hs.src_head_offset if dst_side else hs.dst_head_offset
    return offset == 0 and hs.num_heads * head_bytes == dst_item_bytes < src_item_bytes


def agree(local: list[tuple[TransferState, bool]], all_reduce_min=None) -> list[tuple[TransferState, bool]]:
    """The ranks' common view of each write from every rank's (state, in flight), by one MIN all-reduce over the
    state codes and the negated in-flight flags (all_reduce_min: in place on a CPU tensor; None: one rank)."""
    if not local:
        return []
    codes = torch.tensor([STATE_CODE[st] for st, _ in local] + [-int(busy) for _, busy in local], dtype=torch.int64)
    if all_reduce_min is not None:
        all_reduce_min(codes)
    num = len(local)
    out = []
    for code, neg_busy in zip(codes[:num].tolist(), codes[num:].tolist()):
        failed = CODE_STATE[int(code)] is TransferState.FAILED
        if neg_busy < 0:  # some rank's write is still touching the KV
            out.append((TransferState.TRANSFERRING, failed))
        else:
            out.append((TransferState.FAILED if failed else TransferState.SUCCESS, failed))
    return out


class RankCallHandler:
    """A TP rank > 0's side of RankCall commands (built by the TP worker of a prefill server)."""

    def __init__(self, rank_transfer: RankTransfer, all_reduce_min):
        self.xfer = rank_transfer
        self.all_reduce_min = all_reduce_min

    def __call__(self, payload: bytes) -> None:
        """Run one command. Nothing but PollWrites has a collective, and a failure here fails at most the room or
        peer it names (this rank's write of it turns FAILED), never the rank."""
        cmd = _decode_command(payload)
        if isinstance(cmd, PollWrites):  # its all-reduce must run on every rank
            self.xfer.poll(cmd.abandon_ids, cmd.xfer_ids, cmd.release_ids, self.all_reduce_min)
            return
        try:
            self._run(cmd)
        except Exception:  # noqa: BLE001
            logger.exception("%s failed on this rank", type(cmd).__name__)
            if isinstance(cmd, StartWrite):
                self.xfer.fail(cmd.xfer_id, cmd.key, "this rank could not start its write")
            elif isinstance(cmd, AddPeer):
                self.xfer.peers.pop(cmd.layout.key, None)  # its rooms fail here, so everywhere

    def _run(self, cmd) -> None:
        if isinstance(cmd, AddPeer):
            self.xfer.add_peer(cmd.layout)
        elif isinstance(cmd, RemovePeer):
            self.xfer.remove_peer(cmd.key)
        elif isinstance(cmd, StartWrite):
            self.xfer.start(cmd.xfer_id, cmd.key, cmd.src_slots, cmd.dst_slots, stage_start=cmd.stage_start,
                            dst_stage_start=cmd.dst_stage_start, append=cmd.append)
        elif isinstance(cmd, Unstage):
            self.xfer.unstage(cmd.dst_slots, cmd.stage_start, cmd.src_heads)
        elif isinstance(cmd, Register):
            from pdserve.disagg.bootstrap import register_rank

            register_rank(cmd.bootstrap_host, cmd.bootstrap_port, self.xfer.rank_info(cmd.rank_port, cmd.server_id),
                          cmd.auth_token)


def attach_tp_rank(config: EngineConfig, rank: int, runner, group) -> RankCallHandler:
    """A PD server's TP rank > 0: register its KV pool with a transfer engine, hand its agent to rank 0 (gather),
    and return the handler of rank 0's RankCall commands (a decode rank gets none: its memory is written into)."""
    xfer = RankTransfer(config, rank, runner.kv, runner.model.full_arch.num_kv_heads)
    group.gather_bytes(msgspec.msgpack.encode(xfer.local_info()))
    return RankCallHandler(xfer, group.all_reduce_min_cpu)
