"""Tensor parallelism: the process group of one engine's ranks and how a Llama layer is cut between them.

Ranks talk through torch.distributed (gloo on CPU, NCCL on CUDA; a second gloo group carries the command
stream on CUDA too). Each rank is one process: rank 0 schedules and broadcasts every step as a typed,
msgspec-encoded command (pdserve/engine/tp_worker.py); the other ranks run the same forward on their shard.

Cuts (Megatron / SGLang): q/k/v and gate/up are column-parallel (each rank computes its heads / its slice of
the intermediate size), o and down are row-parallel (partial sums, all-reduced), the embedding and lm_head are
vocab-parallel (each rank holds ceil(V / tp) rows, zero-padded at the end). KV heads: rank r holds
max(1, kv // tp) of them; when tp > kv each head is replicated on tp // kv ranks (rank r holds head
r // (tp // kv)), as SGLang does.
"""

from __future__ import annotations

import datetime
import logging
import socket

import torch
import torch.distributed as dist

from pdserve.model.shm_allreduce import ShmAllReduce
from pdserve.model.tp_layout import check_tp

logger = logging.getLogger(__name__)

# A collective waits at most this long for the other ranks (a dead rank fails the step, not the process).
COLLECTIVE_TIMEOUT_S = 120.0
SHM_CAPACITY_BYTES = 4 << 20  # per rank and buffer: a 512-token chunk of a 2048-wide fp32 model; larger: gloo


def free_local_addr(host: str = "127.0.0.1") -> str:
    """host:port of a free TCP port (rank 0's store when --dist-init-addr is not given)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


class TPGroup:
    """This rank's place in the engine's tensor-parallel group."""

    def __init__(self, rank: int, size: int, init_addr: str, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{init_addr}", world_size=size, rank=rank,
                                timeout=timeout)
        # Commands (bytes) and small CPU control tensors always go over gloo.
        self.cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        self.shm: ShmAllReduce | None = None  # same-machine CPU ranks: all-reduce through shared memory

    def use_shm(self, name: str, create: bool, peers_alive) -> None:
        self.shm = ShmAllReduce(name, self.rank, self.size, SHM_CAPACITY_BYTES, create, peers_alive,
                                COLLECTIVE_TIMEOUT_S)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (the same path on every rank: it depends only on x's size)."""
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        dist.all_reduce(x)
        return x

    def all_reduce_min_cpu(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor | None:
        """[N, C] on every rank -> [N, C * size] on rank 0 (rank order), None elsewhere."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's bytes to every rank (rank 0 passes them, the others None)."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.cpu_group)
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.cpu_group)
        return data if self.rank == 0 else buf.numpy().tobytes()

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Every rank's bytes, in rank order, on rank 0 (None elsewhere)."""
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, size, group=self.cpu_group)
        width = max(int(t.item()) for t in sizes)
        buf = torch.zeros(width, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
        parts = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(buf, parts, dst=0, group=self.cpu_group)
        if parts is None:
            return None
        return [p[: int(n.item())].numpy().tobytes() for p, n in zip(parts, sizes)]

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if dist.is_initialized():
            dist.destroy_process_group()


def check_model_fits(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> None:
    """Raise ValueError when this model cannot be cut into tp ranks."""
    check_tp(num_heads, num_kv_heads, tp)
    if intermediate_size % tp:
        raise ValueError(f"--tp-size {tp} must divide the model's intermediate size ({intermediate_size})")


def vocab_shard(vocab_size: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, end) of the vocab rows rank holds (padded shards of ceil(V / tp); the last may be short)."""
    per = -(-vocab_size // tp)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)
