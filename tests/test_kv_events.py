"""KV cache events (pdserve/kv_events.py) and the router's index of them (pdserve/router/kv_index.py): block
events from the radix cache, vLLM's wire layout, and an index that matches prefixes whatever the publisher's
hash function."""

from __future__ import annotations

import random

import msgspec
import pytest

from pdserve.engine.radix_cache import RadixCache
from pdserve.kv_events import (
    AllBlocksCleared, BlockEvents, BlockRemoved, BlockStored, KVEventBatch, KVEventsConfig, chain_hashes,
)
from pdserve.router.kv_index import BlockIndex

B = 4


def cache_with_events() -> tuple[RadixCache, BlockEvents]:
    tree = RadixCache(lambda slots: None)
    events = BlockEvents(B)
    tree.on_change = events.on_change
    return tree, events


def rehashed(events: list, table: dict) -> list:
    """The same events under another hash function (random 16-byte hashes), as a foreign publisher sends."""
    def h(x):
        return None if x is None else table.setdefault(x, random.randbytes(16))
    out = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out.append(BlockStored([h(x) for x in ev.block_hashes], h(ev.parent_block_hash), ev.token_ids,
                                   ev.block_size))
        elif isinstance(ev, BlockRemoved):
            out.append(BlockRemoved([h(x) for x in ev.block_hashes]))
        else:
            out.append(ev)
    return out


@pytest.mark.parametrize("foreign", [False, True])
def test_block_events_follow_the_cache_and_the_index_matches_prefixes(foreign):
    tree, events = cache_with_events()
    index, table, seq = BlockIndex(), {}, 0

    def deliver():
        nonlocal seq
        batch = events.pending if not foreign else rehashed(events.pending, table)
        index.apply(KVEventBatch(0.0, batch), seq)
        events.pending, seq = [], seq + 1

    a = list(range(100, 110))  # 10 tokens: 2 full blocks
    tree.insert(a, list(range(10)))
    assert [type(e) for e in events.pending] == [BlockStored]
    stored = events.pending[0]
    assert stored.block_hashes == chain_hashes(a, B, 2) and stored.parent_block_hash is None
    assert stored.token_ids == a[:8] and stored.block_size == B
    deliver()
    # a longer prompt sharing 10 tokens: block 2 (tokens 8..11) completes now, block 3 too
    b = a + [7, 7, 7, 7, 7, 7]
    tree.insert(b, list(range(20, 36)))
    stored = events.pending[0]
    assert stored.block_hashes == chain_hashes(b, B, 4)[2:] and stored.parent_block_hash == chain_hashes(a, B, 2)[1]
    assert stored.token_ids == b[8:16]
    deliver()
    assert index.matched_blocks(chain_hashes(b, B, 4)) == 4
    assert index.matched_blocks(chain_hashes(a + [1, 1], B, 3)) == 2  # diverges inside block 2
    assert index.matched_blocks(chain_hashes([5] + a, B, 2)) == 0
    # evicting the longer branch removes blocks 2 and 3 (block 2 straddled the split), keeps 0 and 1
    tree.evict(1)
    assert [type(e) for e in events.pending] == [BlockRemoved]
    assert events.pending[0].block_hashes == chain_hashes(b, B, 4)[2:]
    deliver()
    assert index.matched_blocks(chain_hashes(b, B, 4)) == 2
    tree.reset()
    deliver()
    assert index.matched_blocks(chain_hashes(b, B, 4)) == 0 and not index.held


def test_index_restarted_publisher_and_unknown_parents():
    index = BlockIndex()
    toks = list(range(8))
    h = chain_hashes(toks, B, 2)
    index.apply(KVEventBatch(0.0, [BlockStored(h, None, toks, B)]), 5)
    assert index.matched_blocks(h) == 2
    index.apply(KVEventBatch(0.0, [BlockStored([1], 999, [1, 2, 3, 4], B)]), 6)  # parent never seen: ignored
    assert len(index.held) == 2
    index.apply(KVEventBatch(0.0, [BlockStored([2], None, [1, 2, 3], B)]), 7)  # malformed: ignored
    assert len(index.held) == 2
    index.apply(KVEventBatch(0.0, []), 0)  # sequence numbers start again: a new publisher process
    assert index.matched_blocks(h) == 0
    index.apply(KVEventBatch(0.0, [BlockStored(h, None, toks, B)]), 1)
    index.apply(KVEventBatch(0.0, [AllBlocksCleared()]), 2)
    assert not index.held


def test_wire_layout_is_vllms():
    batch = KVEventBatch(1.5, [BlockStored([11, 12], None, list(range(8)), B), BlockRemoved([11]),
                               AllBlocksCleared()], 0)
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(batch))
    assert raw == [1.5, [["BlockStored", [11, 12], None, list(range(8)), B, None, None],
                         ["BlockRemoved", [11], None], ["AllBlocksCleared"]], 0]
    # what vLLM sends without a rank and with byte hashes decodes too
    vllm = msgspec.msgpack.encode([2.0, [["BlockStored", [b"\x01" * 32], None, [1, 2, 3, 4], 4, None, "GPU"]]])
    got = msgspec.msgpack.Decoder(KVEventBatch).decode(vllm)
    assert got.events[0].block_hashes == [b"\x01" * 32] and got.data_parallel_rank is None
    with pytest.raises(msgspec.DecodeError):
        msgspec.msgpack.Decoder(KVEventBatch).decode(msgspec.msgpack.encode([1.0, [["Pickle", 1]]]))


def test_kv_events_config():
    assert KVEventsConfig.parse('{"enable_kv_cache_events": false}') is None
    cfg = KVEventsConfig.parse('{"enable_kv_cache_events": true, "endpoint": "tcp://*:6000", "block_size": 8}')
    assert cfg.bind_address("127.0.0.1", 2) == "tcp://127.0.0.1:6002" and cfg.block_size == 8
    assert KVEventsConfig.parse('{"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:6000"}')
    # an endpoint naming the server's own --host
    assert KVEventsConfig.parse('{"enable_kv_cache_events": true, "endpoint": "tcp://10.1.2.3:6000"}', "10.1.2.3")
    for bad, message in (("nope", "not JSON"), ("[]", "JSON object"), ('{"x": 1}', "unknown keys"),
                         ('{"enable_kv_cache_events": true, "publisher": "null"}', "publisher"),
                         ('{"enable_kv_cache_events": true, "endpoint": "tcp://10.1.2.3:6000"}', "another host"),
                         ('{"enable_kv_cache_events": true, "endpoint": "ipc:///tmp/x"}', "tcp://"),
                         ('{"enable_kv_cache_events": true, "block_size": 0}', "block_size")):
        with pytest.raises(ValueError, match=message):
            KVEventsConfig.parse(bad)


def test_routed_blocks_count_until_confirmed():
    index = BlockIndex()
    toks = list(range(12))
    h = chain_hashes(toks, B, 3)
    index.note_routed(h)
    assert index.matched_blocks(h) == 3 and not index.held
    index.apply(KVEventBatch(0.0, [BlockStored(h[:2], None, toks[:8], B)]), 0)  # confirmed: held, not pending
    assert index.matched_blocks(h) == 3 and len(index.pending) == 1
    index.pending = {k: 0.0 for k in index.pending}  # its time ran out
    assert index.matched_blocks(h) == 2


def test_index_counts_ranks_and_clears_on_a_gap():
    index = BlockIndex()
    toks = list(range(8))
    h = chain_hashes(toks, B, 2)
    index.apply(KVEventBatch(0.0, [BlockStored(h, None, toks, B)], 0), 0)
    index.apply(KVEventBatch(0.0, [BlockStored(h, None, toks, B)], 1), 0)  # data parallel rank 1 holds it too
    index.apply(KVEventBatch(0.0, [BlockRemoved(h)], 0), 1)
    assert index.matched_blocks(h) == 2  # rank 1 still holds both blocks
    index.apply(KVEventBatch(0.0, [BlockRemoved(h[1:])], 1), 1)
    assert index.matched_blocks(h) == 1
    index.apply(KVEventBatch(0.0, [], 1), 5)  # rank 1 skipped messages 2..4: what we know may be stale
    assert not index.held
