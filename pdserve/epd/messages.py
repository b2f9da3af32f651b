"""Control messages between encode servers and language servers (ZMQ, pickled), per image of a room.

The language server drives, as a PD decode does: once a request's embeddings are needed it reserves rows in
its registered embedding buffer and sends EmbedDestination to the encoder holding each image; the encoder
writes the rows through the transfer engine and answers EmbedDone.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.disagg.transfer import AgentInfo


@dataclass(frozen=True)
class EmbedDestination:
    """language -> encoder: write image `index` of `room` into my buffer at dst_offset."""

    room: int
    index: int
    receiver: AgentInfo  # how to write into the language server's buffer (region 0)
    reply_to: str  # the language server's control address
    dst_offset: int  # bytes into region 0
    rows: int
    hidden: int
    dtype: str  # torch dtype name of the buffer ("float32", "bfloat16", ...)


@dataclass(frozen=True)
class EmbedDone:
    """encoder -> language: the rows landed (ok), or why not."""

    room: int
    index: int
    ok: bool
    error: str | None = None
    data: bytes | None = None  # the rows inline, only from backends that move no data (fake)
    nbytes: int = 0
    transfer_s: float = 0.0


@dataclass(frozen=True)
class EmbedAbort:
    """language -> encoder: forget the room's embeddings (the request ended)."""

    room: int
    reason: str
