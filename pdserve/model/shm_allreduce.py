"""All-reduce through shared memory for the TP ranks of one machine (CPU), as SGLang's and vLLM's CPU backends do.

Why not gloo: a decode step runs 2 all-reduces per layer (61 for SmolLM2-sized models) on tensors of a few KB;
gloo over loopback TCP costs about 1.5 ms each on this 2-core machine, so a TP 2 decode step was ~6x slower
than TP 1 (benchmarks/parallel.py). Here each call is a copy into this rank's slot, a flag store, a spin-wait
for the other ranks' flags and a sum of the slots in rank order (every rank computes the same sum in the same
order, so all ranks hold identical results).

Layout of the segment: one 64-byte flag line per rank (int64 sequence number), then two buffers of `size` slots
of `capacity_bytes`. Call k uses buffer k % 2; a rank writes buffer k % 2 again only at call k + 2, after every
rank announced call k + 1, which each does only after it finished reading call k. Tensors larger than the
capacity take the caller's fallback (gloo). x86-64 only: the flag store must not become visible before the
data (x86's total store order guarantees it; elsewhere gloo is used). A wait has a deadline and checks that the
other ranks' processes live, so a dead rank fails the step within a second instead of hanging it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np
import torch

FLAG_BYTES = 64
SPINS_BEFORE_YIELD = 200
LIVENESS_CHECK_S = 0.5


def shm_allreduce_supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")


class ShmAllReduce:
    def __init__(self, name: str, rank: int, size: int, capacity_bytes: int, create: bool,
                 peers_alive: Callable[[], bool], timeout_s: float):
        self.rank, self.size, self.capacity = rank, size, capacity_bytes
        self.peers_alive, self.timeout_s = peers_alive, timeout_s
        total = FLAG_BYTES * size + 2 * size * capacity_bytes
        # Attaching registers the name with the resource tracker the spawned ranks share with rank 0 (a set: no
        # duplicate); rank 0's unlink unregisters it, and the tracker cleans it up if rank 0 dies first.
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=total if create else 0)
        self.name, self.owner = name, create
        self.flags = np.ndarray((size, FLAG_BYTES // 8), dtype=np.int64, buffer=self.shm.buf)  # [rank, 8]
        if create:
            self.flags[:] = 0
        self.data = torch.frombuffer(self.shm.buf, dtype=torch.uint8, offset=FLAG_BYTES * size,
                                     count=2 * size * capacity_bytes)
        self.seq = 0

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.capacity

    def _slot(self, buffer: int, rank: int, x: torch.Tensor) -> torch.Tensor:
        start = (buffer * self.size + rank) * self.capacity
        return self.data[start : start + x.numel() * x.element_size()].view(x.dtype).view(x.shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (x contiguous, fits())."""
        self.seq += 1
        buffer = self.seq % 2
        self._slot(buffer, self.rank, x).copy_(x)
        self.flags[self.rank, 0] = self.seq
        self._wait(self.seq)
        x.copy_(self._slot(buffer, 0, x))
        for rank in range(1, self.size):
            x.add_(self._slot(buffer, rank, x))
        return x

    def _wait(self, seq: int) -> None:
        flags = self.flags[:, 0]
        spins = 0
        start = last_check = None
        while flags.min() < seq:
            spins += 1
            if spins < SPINS_BEFORE_YIELD:
                continue
            os.sched_yield()  # more ranks than cores: let the late rank run
            now = time.monotonic()
            if start is None:
                start = last_check = now
            elif now - last_check > LIVENESS_CHECK_S:
                last_check = now
                if not self.peers_alive():
                    raise RuntimeError("a tensor-parallel rank process exited")
                if now - start > self.timeout_s:
                    raise TimeoutError(f"tensor-parallel ranks did not reach all-reduce {seq} within "
                                       f"{self.timeout_s:.0f} s")

    def close(self) -> None:
        self.data = None
        self.flags = None
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
