"""KV cache events in vLLM's wire format (what vLLM and SGLang publish with --kv-events-config, and what
vllm-router's and Dynamo's KV-aware routers read): the prefix cache's blocks stored and removed.

Wire: a ZMQ PUB socket; each message is three frames [topic, sequence number (8 bytes big-endian), payload];
the payload is a msgpack KVEventBatch [ts, [event, ...], data_parallel_rank], each event an array tagged with its
kind: ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium],
["BlockRemoved", block_hashes, medium] or ["AllBlocksCleared"]. Decoded with msgspec against these types (never
pickle). A block is `block_size` prompt tokens; its hash chains its parent's (pdserve: 63-bit BLAKE2b, see
chain_hashes); readers must not assume any particular hash: they chain their own from the token ids.

Used by the engine (BlockEvents turns the radix cache's changes into block events; KVEventPublisher sends them)
and by the router (pdserve/router/kv_index.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
DEFAULT_TOPIC = "kv-events"
BlockHash = int | bytes  # vLLM's ExternalBlockHash: pdserve sends ints


class BlockStored(msgspec.Struct, array_like=True, tag=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(msgspec.Struct, array_like=True, tag=True):
    block_hashes: list[BlockHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, array_like=True, tag=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


def chain_hashes(tokens: Sequence[int], block_size: int, num_blocks: int, parent: int = 0) -> list[int]:
    """The chained hashes of the first num_blocks full blocks of tokens: each covers its block's token ids and
    every block before it (through its parent's hash), so equal hashes mean equal prefixes."""
    out = []
    for i in range(num_blocks):
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        digest = hashlib.blake2b(parent.to_bytes(8, "big") + block, digest_size=8).digest()
        parent = int.from_bytes(digest, "big") >> 1
        out.append(parent)
    return out


@dataclass(frozen=True)
class KVEventsConfig:
    """--kv-events-config (vLLM's and SGLang's JSON flag): enable_kv_cache_events, publisher ("zmq"), endpoint
    ("tcp://*:5557": `*` is the server's own --host; a data parallel replica binds port + its rank), topic; and
    pdserve's block_size (tokens per block; vLLM's is its KV block size)."""

    endpoint: str = "tcp://*:5557"
    topic: str = DEFAULT_TOPIC
    block_size: int = DEFAULT_BLOCK_SIZE

    @classmethod
    def parse(cls, text: str, host: str = "127.0.0.1") -> KVEventsConfig | None:
        """None when events are off. ValueError for anything malformed, or an endpoint not on `host` (the
        server's --host)."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-events-config is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        unknown = set(raw) - {"enable_kv_cache_events", "publisher", "endpoint", "topic", "block_size",
                              "replay_endpoint", "buffer_steps", "hwm", "max_queue_size"}
        if unknown:
            raise ValueError(f"--kv-events-config: unknown keys {sorted(unknown)}")
        if not raw.get("enable_kv_cache_events", False):
            return None
        if raw.get("publisher", "zmq") != "zmq":
            raise ValueError(f"--kv-events-config: publisher must be zmq, got {raw['publisher']!r}")
        cfg = cls(str(raw.get("endpoint", cls.endpoint)), str(raw.get("topic", cls.topic)),
                  raw.get("block_size", DEFAULT_BLOCK_SIZE))
        cfg.bind_address(host, 0)  # checks the endpoint's form and host
        return cfg

    def __post_init__(self) -> None:
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
            raise ValueError(f"kv events block_size must be an integer in 1..4096, got {self.block_size!r}")

    def bind_address(self, host: str, dp_rank: int) -> str:
        """The ZMQ address a replica binds: the endpoint's port (+ dp_rank) on the server's host; an endpoint
        naming another host is refused (servers bind only to the host they are given)."""
        parts = urlsplit(self.endpoint)
        if parts.scheme != "tcp" or parts.port is None:
            raise ValueError(f"kv events endpoint must be tcp://HOST:PORT, got {self.endpoint!r}")
        if (parts.hostname or "*") not in ("*", host):
            raise ValueError(f"kv events endpoint {self.endpoint!r} names another host than --host {host}")
        return self.address(host, dp_rank)

    def address(self, host: str, dp_rank: int) -> str:
        """tcp://host:(the endpoint's port + dp_rank)."""
        bracket = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"tcp://{bracket}:{(urlsplit(self.endpoint).port or 0) + dp_rank}"


class BlockEvents:
    """Turns the radix cache's changes (RadixCache.on_change) into block events: a block is stored when its last
    token is cached and removed when any of its tokens is evicted."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.pending: list[KVEvent] = []

    def on_change(self, stored: bool, tokens: Sequence[int], start: int) -> None:
        """tokens[start:] were cached (stored) or evicted; tokens[:start] stay as they were."""
        first, last = start // self.block_size, len(tokens) // self.block_size
        if first >= last:
            return
        hashes = chain_hashes(tokens, self.block_size, last)
        if stored:
            self.pending.append(BlockStored(hashes[first:], hashes[first - 1] if first else None,
                                            list(tokens[first * self.block_size:last * self.block_size]),
                                            self.block_size))
        else:
            self.pending.append(BlockRemoved(hashes[first:]))


class KVEventPublisher:
    """A ZMQ PUB socket sending BlockEvents' pending events once per engine loop pass (one batch)."""

    def __init__(self, cfg: KVEventsConfig, host: str, dp_rank: int) -> None:
        import zmq

        self.blocks = BlockEvents(cfg.block_size)
        self.topic = cfg.topic.encode()
        self.dp_rank = dp_rank
        self.address = cfg.bind_address(host, dp_rank)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        try:
            self._sock.bind(self.address)
        except zmq.ZMQError as e:
            self._sock.close()
            raise ValueError(f"cannot publish KV events on {self.address}: {e}") from None
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        logger.info("publishing KV cache events on %s (topic %r, blocks of %d tokens)", self.address, cfg.topic,
                    cfg.block_size)
        self.send([AllBlocksCleared()])  # a restarted server's subscribers drop what its predecessor held

    def flush(self) -> None:
        if self.blocks.pending:
            events, self.blocks.pending = self.blocks.pending, []
            self.send(events)

    def send(self, events: list[KVEvent]) -> None:
        import zmq

        payload = self._encoder.encode(KVEventBatch(time.time(), events, self.dp_rank))
        try:
            self._sock.send_multipart((self.topic, self._seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("KV events dropped: subscribers are not reading")
        self._seq += 1

    def close(self) -> None:
        self._sock.close()
