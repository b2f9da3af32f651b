"""Control messages between encode servers and language servers (ZMQ, framed by disagg/wire.py), per image.

The language server drives, as a PD decode does: once a request's embeddings are needed it reserves rows in
its registered embedding buffer and sends EmbedDestination to the encoder holding each image; the encoder
writes the rows through the transfer engine and answers EmbedDone.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from pdserve.disagg.messages import NonNegative, Room, Text
from pdserve.disagg.transfer import AgentInfo
from pdserve.disagg.wire import WireMessage

Name = Annotated[str, msgspec.Meta(max_length=300)]
# EmbedDone carries an image's rows inline on the fake backend: room for the embeddings of a large image.
EPD_MAX_FRAME_BYTES = 256 << 20


class EmbedDestination(WireMessage, frozen=True):
    """language -> encoder: write image `index` of `room` into my buffer at dst_offset."""

    room: Room
    index: NonNegative
    receiver: AgentInfo  # how to write into the language server's buffer (region 0)
    reply_to: Name  # the language server's control address
    dst_offset: NonNegative  # bytes into region 0
    rows: NonNegative
    hidden: NonNegative
    dtype: Annotated[str, msgspec.Meta(max_length=32)]  # torch dtype name of the buffer ("float32", ...)


class EmbedDone(WireMessage, frozen=True):
    """encoder -> language: the rows landed (ok), or why not."""

    room: Room
    index: NonNegative
    ok: bool
    error: Text | None = None
    data: bytes | None = None  # the rows inline, only from backends that move no data (fake)
    nbytes: NonNegative = 0
    transfer_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class EmbedAbort(WireMessage, frozen=True):
    """language -> encoder: forget the room's embeddings (the request ended)."""

    room: Room
    reason: Text


EPD_MESSAGES = Union[EmbedDestination, EmbedDone, EmbedAbort]  # what an EPD control socket accepts
