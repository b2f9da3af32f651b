"""KV-aware routing (--policy / --prefill-policy kv_aware): what each worker's prefix cache holds, exactly, from the KV
cache events it publishes (pdserve/kv_events.py: vLLM's wire format; pdserve servers with --kv-events-config, vLLM
and SGLang servers alike), and the request's token ids (RouteTokenizer).

The router follows a worker as soon as a policy sees it: it reads the worker's /server_info for its event endpoints
(kv_events_endpoints) and subscribes (ZMQ SUB). Each BlockStored is re-hashed here from its token ids and its parent
(so the publisher's hash function does not matter); a request matches a worker by how many of its leading full
blocks that worker holds (on any of its data parallel ranks: a block is counted per rank that holds it), or was just
sent and will hold (a routed prompt's blocks count for PENDING_TTL_S until its events confirm them, so a burst of
one prefix follows its first request). The index is bounded per worker; a restarted publisher (its sequence numbers
start again, or AllBlocksCleared) or a gap in its sequence numbers (missed messages) empties it: it refills from new
events, never trusting a stale view."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import aiohttp
import msgspec

from pdserve.kv_events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEventBatch, chain_hashes

logger = logging.getLogger(__name__)

MAX_BLOCKS_PER_WORKER = 1_000_000  # a worker's index past this is emptied (it refills from new events)
MAX_EVENT_FRAME_BYTES = 16 << 20
INFO_RETRY_S = 2.0
INFO_TIMEOUT_S = 10.0
PENDING_TTL_S = 10.0


class BlockIndex:
    """The blocks one worker holds: the publisher's hashes mapped to this router's own chained hashes."""

    def __init__(self) -> None:
        self.ours: dict[BlockHash, int] = {}  # publisher's hash -> our chained hash
        self.held: dict[int, int] = {}  # our hash -> how many stores (data parallel ranks) hold it
        self.pending: dict[int, float] = {}  # our hash -> until when: routed here, not confirmed by an event yet
        self.block_size = 0  # from the events (0: none seen yet)
        self.last_seq: dict[int, int] = {}  # per data parallel rank

    def apply(self, batch: KVEventBatch, seq: int) -> None:
        rank = batch.data_parallel_rank or 0
        last = self.last_seq.get(rank)
        if last is not None and seq != last + 1:  # restarted (what we knew is gone) or messages missed
            self.clear()
        if len(self.last_seq) < 4096 or rank in self.last_seq:
            self.last_seq[rank] = seq
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._stored(ev)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    ours = self.ours.get(h)
                    if ours is not None:
                        count = self.held.get(ours, 0) - 1
                        if count > 0:
                            self.held[ours] = count
                        else:
                            self.held.pop(ours, None)
                            del self.ours[h]
            elif isinstance(ev, AllBlocksCleared):
                self.clear()
        if len(self.ours) > MAX_BLOCKS_PER_WORKER:
            self.clear()

    def _stored(self, ev: BlockStored) -> None:
        size = ev.block_size
        if size < 1 or len(ev.token_ids) != size * len(ev.block_hashes):
            return  # malformed: ignored
        if ev.parent_block_hash is None:
            parent = 0
        elif ev.parent_block_hash in self.ours:
            parent = self.ours[ev.parent_block_hash]
        else:
            return  # its parent was never seen (a missed message): these blocks cannot be placed
        self.block_size = size
        for i, h in enumerate(ev.block_hashes):
            parent = chain_hashes(ev.token_ids[i * size:(i + 1) * size], size, 1, parent)[0]
            self.ours[h] = parent
            self.held[parent] = self.held.get(parent, 0) + 1
            self.pending.pop(parent, None)

    def clear(self) -> None:
        self.ours.clear()
        self.held.clear()
        self.pending.clear()

    def note_routed(self, hashes: Sequence[int]) -> None:
        now = time.monotonic()
        if len(self.pending) > MAX_BLOCKS_PER_WORKER // 10:
            self.pending = {h: t for h, t in self.pending.items() if t > now}
        until = now + PENDING_TTL_S
        for h in hashes:
            if h not in self.held:
                self.pending[h] = until

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        n, now = 0, time.monotonic()
        while n < len(hashes) and (hashes[n] in self.held or self.pending.get(hashes[n], 0.0) > now):
            n += 1
        return n


def _prompt_hashes(tokens: Sequence[int], block_size: int, cache: dict[int, list[int]]) -> list[int]:
    """The prompt's chained block hashes for this block size, computed once per request (cache)."""
    if block_size not in cache:
        cache[block_size] = chain_hashes(tokens, block_size, len(tokens) // block_size)
    return cache[block_size]


class KVEventFeed:
    """One subscription per followed worker, each feeding that worker's BlockIndex."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.indexes: dict[str, BlockIndex] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._headers = headers or {}
        self.num_bad_messages = 0

    def follow(self, url: str) -> None:
        if url in self._tasks:
            return
        self.indexes[url] = BlockIndex()
        self._tasks[url] = asyncio.get_running_loop().create_task(self._run(url))

    def forget(self, url: str) -> None:
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
        self.indexes.pop(url, None)

    def close(self) -> None:
        for url in list(self._tasks):
            self.forget(url)

    def matched_tokens(self, url: str, tokens: Sequence[int], cache: dict[int, list[int]]) -> int:
        """Leading prompt tokens whose KV the worker holds (whole blocks). cache: block size -> the prompt's
        chained hashes, shared across the workers of one request."""
        index = self.indexes.get(url)
        if index is None or not index.block_size:
            return 0
        return index.matched_blocks(_prompt_hashes(tokens, index.block_size, cache)) * index.block_size

    def note_routed(self, url: str, tokens: Sequence[int], cache: dict[int, list[int]]) -> None:
        """The prompt went to this worker: its blocks count as held there until confirmed or PENDING_TTL_S."""
        index = self.indexes.get(url)
        if index is not None and index.block_size:
            index.note_routed(_prompt_hashes(tokens, index.block_size, cache))

    async def _endpoints(self, url: str) -> tuple[list[str], str]:
        """The worker's event endpoints and topic (from /server_info), waiting while it has none."""
        timeout = aiohttp.ClientTimeout(total=INFO_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers) as session:
            while True:
                try:
                    async with session.get(url + "/server_info") as r:
                        if r.status != 200:
                            raise ValueError(f"/server_info answered {r.status}")
                        info = await r.json()
                    endpoints = info.get("kv_events_endpoints") if isinstance(info, dict) else None
                    if isinstance(endpoints, list) and endpoints and all(isinstance(e, str) for e in endpoints):
                        return endpoints, str(info.get("kv_events_topic") or "")
                    logger.warning("kv_aware: %s publishes no KV events (start it with --kv-events-config); "
                                   "it is routed by load alone", url)
                    return [], ""
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    logger.info("kv_aware: cannot read %s/server_info yet (%s); retrying", url, e)
                await asyncio.sleep(INFO_RETRY_S)

    async def _run(self, url: str) -> None:
        import zmq
        import zmq.asyncio

        endpoints, topic = await self._endpoints(url)
        if not endpoints:
            return
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_FRAME_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        try:
            for ep in endpoints:
                sock.connect(ep)
            logger.info("kv_aware: following the KV events of %s at %s", url, ", ".join(endpoints))
            while True:
                frames = await sock.recv_multipart()
                index = self.indexes.get(url)
                if index is None:
                    return
                try:
                    if len(frames) != 3 or len(frames[1]) != 8:
                        raise ValueError(f"{len(frames)} frames")
                    index.apply(decoder.decode(frames[2]), int.from_bytes(frames[1], "big"))
                except Exception as e:  # noqa: BLE001 - one bad message, never the feed
                    self.num_bad_messages += 1
                    logger.warning("kv_aware: bad KV event message from %s: %s: %s", url, type(e).__name__, e)
        except zmq.ZMQError as e:
            logger.warning("kv_aware: the KV event feed of %s failed: %s", url, e)
        finally:
            with contextlib.suppress(Exception):
                sock.close()
