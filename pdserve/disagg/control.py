"""ZMQ control plane between servers: one PULL socket per engine, PUSH sockets to peers (cached, released).

Frames are typed and signed by wire.py; a frame that fails its checks is dropped (logged, counted in
`dropped`), never raised into the engine loop. ZMQ's MAXMSGSIZE makes the socket itself refuse an oversized
message before buffering it.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from pdserve.disagg.wire import MAX_FRAME_BYTES, FrameCodec, WireMessage

logger = logging.getLogger(__name__)

MAX_RECV_PER_POLL = 4096  # frames read per recv_all (a flood cannot hold the engine loop)


class ControlChannel:
    def __init__(self, host: str, messages: Any, secret: bytes | None, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.codec = FrameCodec(messages, secret, max_frame_bytes)
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + 64 * 1024)  # both parts, with msgpack framing
        self.pull.setsockopt(zmq.LINGER, 0)
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.addr = f"tcp://{host}:{port}"
        self.port = port
        self._push: dict[str, zmq.Socket] = {}

    @property
    def dropped(self) -> dict[str, int]:
        """Frames dropped so far, by reason (size, parts, signature, malformed, version, replay)."""
        return dict(self.codec.dropped)

    def send(self, addr: str, msg: WireMessage) -> None:
        sock = self._push.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(addr)
            self._push[addr] = sock
        try:
            sock.send_multipart(self.codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("control message to %s dropped (peer not reading)", addr)

    def forget(self, addr: str) -> None:
        sock = self._push.pop(addr, None)
        if sock is not None:
            sock.close(0)

    def recv_all(self) -> list[WireMessage]:
        out: list[WireMessage] = []
        for _ in range(MAX_RECV_PER_POLL):
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self.codec.decode(parts)
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        for s in self._push.values():
            s.close(0)
        self._push.clear()
        self.pull.close(0)
