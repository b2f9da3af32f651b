"""Transfer queues, as SGLang shards them: SGLANG_DISAGGREGATION_QUEUE_SIZE queues, each request's writes go
to the queue of its decode instance (a stable hash of its agent name), and SGLANG_DISAGGREGATION_THREAD_POOL_SIZE
threads in all serve them (at least one per queue). A worker starts a write on the transfer engine and polls
it to the end, so one slow or hung decode holds up only the queue it hashes to, never the engine loop or the
writes to other decodes. The engine loop only reads each write's state (`poll`) and abandons one past its
deadline (`release`: the worker releases the backend handle, which aborts an active write).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field

from pdserve.disagg.transfer import TransferEngine, TransferState, WriteRun

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.0002  # a worker's sleep between polls of an active write


@dataclass(eq=False)
class QueuedWrite:
    """One room's write: its state is set by a worker and read by the engine loop."""

    peer: str
    runs: list[WriteRun]
    shard: int
    state: TransferState = TransferState.TRANSFERRING
    error: str | None = None
    abandoned: bool = False  # set by the engine loop: stop and release
    started: threading.Event = field(default_factory=threading.Event)


class TransferQueues:
    def __init__(self, engine: TransferEngine, num_queues: int, num_threads: int):
        if num_queues < 1 or num_threads < 1:
            raise ValueError("SGLANG_DISAGGREGATION_QUEUE_SIZE and _THREAD_POOL_SIZE must be >= 1")
        self.engine = engine
        self.queues: list[queue.SimpleQueue[QueuedWrite | None]] = [queue.SimpleQueue() for _ in range(num_queues)]
        per_queue = max(1, num_threads // num_queues)
        self.threads = [threading.Thread(target=self._serve, args=(q,), name=f"transfer-q{i}", daemon=True)
                        for i, q in enumerate(self.queues) for _ in range(per_queue)]
        for t in self.threads:
            t.start()

    def shard_of(self, peer: str) -> int:
        return zlib.crc32(peer.encode()) % len(self.queues)

    def write(self, peer: str, runs: list[WriteRun]) -> QueuedWrite:
        job = QueuedWrite(peer, runs, self.shard_of(peer))
        self.queues[job.shard].put(job)
        return job

    def poll(self, job: QueuedWrite) -> TransferState:
        return job.state

    def release(self, job: QueuedWrite) -> None:
        """The engine loop is done with this write (finished, or abandoned at its deadline)."""
        job.abandoned = True

    def close(self) -> None:
        for q in self.queues:
            for _ in range(len(self.threads)):
                q.put(None)

    def _serve(self, q: queue.SimpleQueue[QueuedWrite | None]) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - a failed write fails its room, never the worker
                job.error = f"{type(e).__name__}: {e}"
                job.state = TransferState.FAILED
                logger.warning("transfer to %s failed: %s", job.peer, job.error)

    def _run(self, job: QueuedWrite) -> None:
        if job.abandoned:
            job.state = TransferState.FAILED
            return
        job.started.set()
        handle = self.engine.write(job.peer, job.runs)
        try:
            state = self.engine.poll(handle)
            while state is TransferState.TRANSFERRING and not job.abandoned:
                time.sleep(POLL_INTERVAL_S)
                state = self.engine.poll(handle)
        finally:
            self.engine.release(handle)
        job.state = TransferState.FAILED if job.abandoned and state is TransferState.TRANSFERRING else state
