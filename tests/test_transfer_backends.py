"""Real transfer backends (fake, nixl, mooncake) between two OS processes on 127.0.0.1.

The receiver ("decode") registers a KV-pool-like set of tensors and sends its AgentInfo to the sender
("prefill") over a multiprocessing Pipe; the sender writes scattered and contiguous slots
(src slots != dst slots) with kv_write_runs and polls to SUCCESS; the receiver then checks that exactly
the destination slots changed, byte for byte. A backend whose package cannot be imported is skipped
with the import error as the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import multiprocessing as mp
import os
import time
import traceback

import pytest

NUM_REGIONS = 4
NUM_SLOTS = 64
SLOT_SHAPE = (3, 64)  # kv heads x head dim, float32: 768 B per slot
HOST = "127.0.0.1"
WRITE_DEADLINE_S = 15.0
# scattered and contiguous source slots, written to different (partly reversed, partly shifted) slots
SRC_SLOTS = [0, 1, 2, 3, 9, 17, 18, 19, 20, 21, 22, 40, 5, 63]
DST_SLOTS = [10, 11, 12, 13, 4, 30, 31, 32, 33, 34, 35, 62, 50, 0]


@functools.cache
def _backend_missing(backend: str) -> str | None:
    if backend == "fake":
        return None
    if backend == "nixl":
        if not any(importlib.util.find_spec(m) for m in ("nixl", "nixl_cu12", "nixl_cu13")):
            return "nixl not installed (pip install nixl-cu12==1.5.1)"
        return None
    if importlib.util.find_spec("mooncake") is None:
        return "mooncake not installed (pip install mooncake-transfer-engine-non-cuda==0.3.13.post1)"
    try:  # needs libibverbs.so.1 even for TCP; check in a child so this process stays clean
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            err = pool.apply(_try_import_mooncake)
    except Exception as e:  # noqa: BLE001
        err = repr(e)
    return err


def _try_import_mooncake() -> str | None:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as e:
        return f"mooncake not importable (apt-get install libibverbs1?): {e}"
    return None


def _pool(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn((NUM_SLOTS, *SLOT_SHAPE), generator=g, dtype=torch.float32) for _ in range(NUM_REGIONS)]


def _regions(tensors):
    from pdserve.disagg.transfer import MemRegion

    out = []
    for t in tensors:
        item = t[0].numel() * t.element_size()
        out.append(MemRegion(t.data_ptr(), t.numel() * t.element_size(), item))
    return out


def _receiver(conn, backend: str, seed: int) -> None:
    """Decode side: register a pool, publish AgentInfo, then verify on request."""
    try:
        import torch

        from pdserve.disagg.transfer import create_transfer_engine

        pool = _pool(seed)
        before = [t.clone() for t in pool]
        eng = create_transfer_engine(backend, f"decode-{backend}-{os.getpid()}", HOST, _regions(pool))
        conn.send(("info", eng.local_info()))
        while True:
            msg = conn.recv()
            if msg[0] == "exit":
                break
            _, src_slots, dst_slots, sender_seed, expect_change = msg
            src_pool = _pool(sender_seed)  # the sender's pool is deterministic from its seed
            errors = []
            for r in range(NUM_REGIONS):
                expected = before[r].clone()
                if expect_change:
                    expected[torch.tensor(dst_slots)] = src_pool[r][torch.tensor(src_slots)]
                if not torch.equal(pool[r].view(torch.int32), expected.view(torch.int32)):
                    bad = (pool[r] != expected).flatten(1).any(1).nonzero().flatten().tolist()
                    errors.append(f"region {r}: slots {bad} differ from expected")
            conn.send(("checked", errors))
            before = [t.clone() for t in pool]
        eng.close()
        conn.send(("closed",))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


def _sender(conn, backend: str, seed: int) -> None:
    """Prefill side: receive the peer's AgentInfo, then write on request and report the final state."""
    try:
        from pdserve.disagg.transfer import TransferState, create_transfer_engine, kv_write_runs

        pool = _pool(seed)
        regions = _regions(pool)
        eng = create_transfer_engine(backend, f"prefill-{backend}-{os.getpid()}", HOST, regions)
        peer = conn.recv()
        eng.add_peer(peer)
        eng.add_peer(peer)  # idempotent
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg[0] == "exit":
                break
            _, src_slots, dst_slots = msg
            runs = kv_write_runs(regions, range(NUM_REGIONS), src_slots, dst_slots)
            t0 = time.monotonic()
            try:
                h = eng.write(peer.agent_name, runs)
            except Exception as e:  # noqa: BLE001 - a clear error is an acceptable outcome for a dead peer
                conn.send(("raised", f"{type(e).__name__}: {e}", time.monotonic() - t0))
                continue
            state = eng.poll(h)
            while state is TransferState.TRANSFERRING and time.monotonic() - t0 < WRITE_DEADLINE_S:
                time.sleep(0.001)
                state = eng.poll(h)
            eng.release(h)
            conn.send(("state", state.name, time.monotonic() - t0, repr(h)))
        eng.close()
        conn.send(("closed",))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


def _recv(conn, timeout: float = 20.0):
    if not conn.poll(timeout):
        raise AssertionError(f"no message from child within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise AssertionError("child failed:\n" + msg[1])
    return msg


class _Pair:
    def __init__(self, backend: str):
        ctx = mp.get_context("spawn")
        self.rconn, rchild = ctx.Pipe()
        self.sconn, schild = ctx.Pipe()
        self.recv_seed, self.send_seed = 1, 2
        self.receiver = ctx.Process(target=_receiver, args=(rchild, backend, self.recv_seed), daemon=True)
        self.sender = ctx.Process(target=_sender, args=(schild, backend, self.send_seed), daemon=True)
        self.receiver.start()
        self.sender.start()
        kind, info = _recv(self.rconn, 30)
        assert kind == "info" and info.backend == backend
        self.info = info
        self.sconn.send(info)
        assert _recv(self.sconn, 30)[0] == "ready"

    def write(self, src, dst):
        self.sconn.send(("write", src, dst))
        return _recv(self.sconn, WRITE_DEADLINE_S + 10)

    def check(self, src, dst, expect_change: bool):
        self.rconn.send(("check", src, dst, self.send_seed, expect_change))
        kind, errors = _recv(self.rconn)
        assert kind == "checked"
        return errors

    def close(self):
        for conn, proc in ((self.sconn, self.sender), (self.rconn, self.receiver)):
            if proc.is_alive():
                try:
                    conn.send(("exit",))
                    _recv(conn, 10)
                except Exception:  # noqa: BLE001
                    pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


@pytest.mark.parametrize("backend", ["fake", "nixl", "mooncake"])
def test_write_lands_at_destination_slots(backend):
    missing = _backend_missing(backend)
    if missing:
        pytest.skip(missing)
    pair = _Pair(backend)
    try:
        expect_change = backend != "fake"  # fake moves no data: nothing may change at all
        kind, state, secs, desc = pair.write(SRC_SLOTS, DST_SLOTS)
        assert kind == "state" and state == "SUCCESS", desc
        assert pair.check(SRC_SLOTS, DST_SLOTS, expect_change) == []
        # a second write (one contiguous block, reversed direction of the slot shift) to the same peer
        src2, dst2 = list(range(24, 40)), list(range(44, 60))
        kind, state, secs, desc = pair.write(src2, dst2)
        assert kind == "state" and state == "SUCCESS", desc
        assert pair.check(src2, dst2, expect_change) == []
        # an empty write succeeds and changes nothing
        kind, state, secs, desc = pair.write([], [])
        assert state == "SUCCESS", desc
        assert pair.check([], [], False) == []
    finally:
        pair.close()


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])  # fake cannot notice a dead peer: it moves nothing
def test_write_to_dead_peer_fails_in_bounded_time(backend):
    missing = _backend_missing(backend)
    if missing:
        pytest.skip(missing)
    pair = _Pair(backend)
    try:
        kind, state, _, desc = pair.write(SRC_SLOTS, DST_SLOTS)  # connection established and used once
        assert state == "SUCCESS", desc
        pair.receiver.kill()
        pair.receiver.join(10)
        assert not pair.receiver.is_alive()
        msg = pair.write(SRC_SLOTS, DST_SLOTS)
        if msg[0] == "raised":
            _, err, secs = msg
        else:
            _, state, secs, desc = msg
            assert state == "FAILED", desc
        assert secs < WRITE_DEADLINE_S
    finally:
        pair.close()
