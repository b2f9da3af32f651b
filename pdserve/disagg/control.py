"""ZMQ control plane between engines: one PULL socket per engine, PUSH sockets to peers (cached)."""

from __future__ import annotations

import logging
import pickle

import zmq

logger = logging.getLogger(__name__)


class ControlChannel:
    def __init__(self, host: str):
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.addr = f"tcp://{host}:{port}"
        self.port = port
        self._push: dict[str, zmq.Socket] = {}

    def send(self, addr: str, msg: object) -> None:
        sock = self._push.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(addr)
            self._push[addr] = sock
        try:
            sock.send(pickle.dumps(msg), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("control message to %s dropped (peer not reading)", addr)

    def forget(self, addr: str) -> None:
        sock = self._push.pop(addr, None)
        if sock is not None:
            sock.close(0)

    def recv_all(self) -> list[object]:
        out = []
        while True:
            try:
                out.append(pickle.loads(self.pull.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    def close(self) -> None:
        for s in self._push.values():
            s.close(0)
        self.pull.close(0)
