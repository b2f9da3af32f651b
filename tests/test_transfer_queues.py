"""Transfer queues sharded by decode instance (SGLANG_DISAGGREGATION_QUEUE_SIZE / _THREAD_POOL_SIZE): a
deliberately slow decode holds up only its own queue. The slow peer never finishes until the test lets it, so
the outcome does not depend on timing."""

from __future__ import annotations

import threading
import time

from pdserve.disagg.transfer import AgentInfo, TransferEngine, TransferState, WriteRun
from pdserve.disagg.transfer_queues import TransferQueues


class SlowPeerEngine(TransferEngine):
    """Writes to "slow-*" peers stay in flight until `unblock` is set; others finish at once."""

    name = "test"

    def __init__(self):
        super().__init__("prefill-test", "127.0.0.1", [])
        self.unblock = threading.Event()
        self.released: list[str] = []

    def local_info(self) -> AgentInfo:
        return AgentInfo(self.name, self.agent_name, b"", ())

    def add_peer(self, info: AgentInfo) -> None:
        pass

    def remove_peer(self, agent_name: str) -> None:
        pass

    def write(self, peer: str, runs: list[WriteRun]) -> object:
        return peer

    def poll(self, handle: object) -> TransferState:
        slow = str(handle).startswith("slow")
        return TransferState.TRANSFERRING if slow and not self.unblock.is_set() else TransferState.SUCCESS

    def release(self, handle: object) -> None:
        self.released.append(str(handle))


def _names_on_distinct_shards(queues: TransferQueues) -> tuple[str, str]:
    slow = "slow-decode"
    fast = next(f"fast-decode-{i}" for i in range(1000)
                if queues.shard_of(f"fast-decode-{i}") != queues.shard_of(slow))
    return slow, fast


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_slow_decode_delays_only_its_own_queue():
    engine = SlowPeerEngine()
    queues = TransferQueues(engine, num_queues=4, num_threads=4)
    try:
        slow_name, fast_name = _names_on_distinct_shards(queues)
        slow = queues.write(slow_name, [])
        assert _wait(slow.started.is_set)
        fast = [queues.write(fast_name, []) for _ in range(3)]
        assert _wait(lambda: all(queues.poll(f) is TransferState.SUCCESS for f in fast))
        assert queues.poll(slow) is TransferState.TRANSFERRING  # still held by its peer
        behind = queues.write(slow_name, [])  # same decode, same queue: waits behind it
        time.sleep(0.2)
        assert not behind.started.is_set()
        engine.unblock.set()
        assert _wait(lambda: queues.poll(slow) is queues.poll(behind) is TransferState.SUCCESS)
    finally:
        engine.unblock.set()
        queues.close()


def test_one_queue_serialises_every_decode():
    engine = SlowPeerEngine()
    queues = TransferQueues(engine, num_queues=1, num_threads=1)
    try:
        slow = queues.write("slow-decode", [])
        assert _wait(slow.started.is_set)
        fast = queues.write("fast-decode", [])
        time.sleep(0.2)
        assert queues.poll(fast) is TransferState.TRANSFERRING and not fast.started.is_set()
        engine.unblock.set()
        assert _wait(lambda: queues.poll(fast) is TransferState.SUCCESS)
    finally:
        engine.unblock.set()
        queues.close()


def test_an_abandoned_write_is_released_and_fails():
    engine = SlowPeerEngine()
    queues = TransferQueues(engine, num_queues=2, num_threads=2)
    try:
        hung = queues.write("slow-hung", [])
        assert _wait(hung.started.is_set)
        queues.release(hung)  # the prefill's transfer deadline passed
        assert _wait(lambda: queues.poll(hung) is TransferState.FAILED)
        assert _wait(lambda: engine.released == ["slow-hung"])
    finally:
        queues.close()
