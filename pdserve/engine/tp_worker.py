"""Tensor-parallel ranks of one engine: rank 0 (the engine process: scheduler, sampler, PD control) leads;
ranks 1..tp-1 are processes that run the same forward on their shard of the model.

Every step rank 0 broadcasts one typed command (msgspec msgpack over the group's gloo channel; no pickle): the
ForwardBatch to run, a keepalive when idle (a rank's wait for the next command has a deadline:
COLLECTIVE_TIMEOUT_S), or shutdown. A rank that dies breaks the group: rank 0's next collective raises
TensorRanksFailed, the engine fails every request it holds and exits; the other ranks see the broken group (or
their deadline) and exit too. Ranks on other machines (--nnodes, --node-rank) are started by `pdserve serve
--node-rank N` there (serve_node) and join rank 0 at --dist-init-addr.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import uuid
from dataclasses import replace
from typing import Union

import msgspec
import torch

from pdserve.config import EngineConfig, is_loopback
from pdserve.engine.forward_batch import ForwardBatch
from pdserve.model.parallel import COLLECTIVE_TIMEOUT_S, TPGroup, free_local_addr
from pdserve.model.shm_allreduce import shm_allreduce_supported

logger = logging.getLogger(__name__)

KEEPALIVE_S = COLLECTIVE_TIMEOUT_S / 6  # idle rank 0 broadcasts this often


class TensorRanksFailed(RuntimeError):
    """A collective with the other TP ranks failed (a rank died or hung): the engine cannot go on."""


class Init(msgspec.Struct, tag=True):
    num_slots: int  # KV pool size every rank allocates (rank 0's choice)
    shm_name: str | None = None  # the shared-memory all-reduce segment (ranks of one machine, CPU)


class RunForward(msgspec.Struct, tag=True):
    batch: ForwardBatch


class Keepalive(msgspec.Struct, tag=True):
    pass


class RankCall(msgspec.Struct, tag=True):
    """Work for the ranks' PD transfer side (pdserve/disagg/rank_transfer.py encodes and decodes it)."""

    payload: bytes


class Shutdown(msgspec.Struct, tag=True):
    pass


TPCommand = Union[Init, RunForward, Keepalive, RankCall, Shutdown]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TPCommand)


class TensorRanks:
    """Rank 0's handle on the other ranks: starts this node's, sends commands."""

    def __init__(self, group: TPGroup, procs: list[mp.Process], shm_name: str | None):
        self.group, self.procs, self.shm_name = group, procs, shm_name
        self._last_sent = time.monotonic()

    @classmethod
    def start(cls, config: EngineConfig, hf_dir: str, device: torch.device) -> "TensorRanks":
        host = config.host if is_loopback(config.host) else "0.0.0.0"
        init_addr = config.dist_init_addr or free_local_addr("127.0.0.1" if is_loopback(host) else config.host)
        config = replace(config, dist_init_addr=init_addr)
        procs = start_local_ranks(config, hf_dir, range(1, config.ranks_per_node))
        logger.info("tensor parallel: %d ranks (%d on this node), rendezvous at %s", config.tp_size,
                    config.ranks_per_node, init_addr)
        try:
            group = TPGroup(0, config.tp_size, init_addr, device)
        except Exception as e:
            for p in procs:
                p.kill()
            raise RuntimeError(f"tensor-parallel ranks did not join at {init_addr}: {e}") from None
        shm_name = None
        if device.type == "cpu" and config.nnodes == 1 and shm_allreduce_supported():
            shm_name = f"pdserve-tp-{uuid.uuid4().hex[:16]}"
            group.use_shm(shm_name, True, lambda: all(p.is_alive() for p in procs))
        return cls(group, procs, shm_name)

    def ready(self, num_slots: int) -> None:
        """Rank 0's model is loaded: size every rank's pool, wait until every rank loaded its shard."""
        self.send(Init(num_slots, self.shm_name))
        try:
            torch.distributed.barrier(group=self.group.cpu_group)
        except Exception as e:
            raise TensorRanksFailed(f"a tensor-parallel rank failed to load: {e}") from None

    def send(self, cmd: TPCommand) -> None:
        dead = [p.pid for p in self.procs if not p.is_alive()]
        if dead:
            raise TensorRanksFailed(f"tensor-parallel rank process(es) {dead} exited")
        try:
            self.group.broadcast_bytes(_encoder.encode(cmd))
        except Exception as e:
            raise TensorRanksFailed(f"tensor-parallel group broken: {type(e).__name__}: {e}") from None
        self._last_sent = time.monotonic()

    def call(self, payload: bytes) -> None:
        self.send(RankCall(payload))

    def gather(self, data: bytes) -> list[bytes]:
        """Every rank's bytes (rank 0's = data), rank order."""
        try:
            out = self.group.gather_bytes(data)
        except Exception as e:
            raise TensorRanksFailed(f"tensor-parallel group broken: {type(e).__name__}: {e}") from None
        assert out is not None
        return out

    def keepalive(self) -> None:
        if time.monotonic() - self._last_sent >= KEEPALIVE_S:
            self.send(Keepalive())

    def close(self) -> None:
        try:
            self.send(Shutdown())
        except TensorRanksFailed:
            pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.group.close()


def start_local_ranks(config: EngineConfig, hf_dir: str, ranks: range) -> list[mp.Process]:
    """Start TP ranks `ranks` (global rank numbers) on this machine."""
    ctx = mp.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    procs = []
    for rank in ranks:
        p = ctx.Process(target=run_tp_worker, args=(config, hf_dir, rank, level), daemon=True,
                        name=f"pdserve-tp{rank}")
        p.start()
        procs.append(p)
    return procs


def run_tp_worker(config: EngineConfig, hf_dir: str, rank: int, log_level: str) -> None:
    """A TP rank > 0: join the group, load this rank's shard, run rank 0's commands until shutdown."""
    logging.basicConfig(level=log_level, format=f"[tp{rank} {os.getpid()}] %(levelname)s %(name)s: %(message)s")
    from pdserve.engine.model_runner import ModelRunner, pick_device_dtype

    device, _ = pick_device_dtype(config.model.device, config.model.dtype)
    if device.type == "cuda":  # rank 0's GPU + this rank's place on its node
        device = torch.device("cuda", ((device.index or 0) + rank % config.ranks_per_node) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        config = replace(config, model=replace(config.model, device=str(device)))
    group = TPGroup(rank, config.tp_size, config.dist_init_addr, device)
    try:
        init = _decoder.decode(group.broadcast_bytes(None))
        if not isinstance(init, Init):
            raise RuntimeError(f"expected Init, got {type(init).__name__}")
        if init.shm_name is not None:  # rank 0 is this process's parent on this machine
            parent = os.getppid()
            group.use_shm(init.shm_name, False, lambda: os.getppid() == parent)
        runner = ModelRunner(config, hf_dir, (), tp_group=group, num_slots=init.num_slots)
        torch.distributed.barrier(group=group.cpu_group)
        on_call = None
        if config.disaggregation_mode in ("prefill", "decode"):  # this rank's KV is written / read directly
            from pdserve.disagg.rank_transfer import attach_tp_rank

            on_call = attach_tp_rank(config, rank, runner, group)
        while True:
            cmd = _decoder.decode(group.broadcast_bytes(None))
            if isinstance(cmd, Shutdown):
                break
            if isinstance(cmd, RunForward):
                runner.forward(cmd.batch)
            elif isinstance(cmd, RankCall) and on_call is not None:
                on_call(cmd.payload)
    except Exception as e:  # noqa: BLE001 - the group is broken (rank 0 gone or failed): exit
        logger.error("tensor-parallel rank %d stops: %s: %s", rank, type(e).__name__, e)
        os._exit(1)
    if on_call is not None:
        on_call.xfer.close()
    os._exit(0)  # rank 0 tears the group down; gloo's threads need no orderly exit here


def serve_node(config: EngineConfig, hf_dir: str) -> int:
    """`pdserve serve --node-rank N` (N > 0): run this node's TP ranks until they exit; their exit code."""
    first = config.node_rank * config.ranks_per_node
    procs = start_local_ranks(config, hf_dir, range(first, first + config.ranks_per_node))
    logger.info("node %d: tensor-parallel ranks %d..%d joining %s", config.node_rank, first,
                first + config.ranks_per_node - 1, config.dist_init_addr)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
    return max((p.exitcode or 0) for p in procs)
