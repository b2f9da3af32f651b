"""The frame codec of every control socket between servers (PD control, EPD control): typed, versioned, signed.

A frame is two ZMQ parts: a msgpack `Envelope` (wire version, send time, random nonce, and one message of the
socket's tagged union) and its HMAC-SHA256 under the deployment's shared secret (empty part when the deployment
has none: loopback-only deployments, see config.py). The decoder is msgspec's typed msgpack decoder: it builds
only the declared structs (tag, field names, types and the union are checked; nothing else is constructed, no
code is loaded, unlike pickle). A frame is dropped, with a log line and a counted reason, when it is too large,
has the wrong number of parts, a bad or missing signature, a wire version this build does not speak, a send
time outside the replay window, a nonce already seen, or does not decode into the union.

msgspec is used rather than a hand-written format: it validates while decoding, in C, at ~1 us per message.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import time
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_FRAME_BYTES = 4 << 20  # PD control: slot lists of the longest prompts and agent metadata fit
REPLAY_WINDOW_S = 60.0  # a signed frame older (or newer) than this, by the sender's clock, is refused
NONCE_BYTES = 16


class WireMessage(msgspec.Struct, frozen=True, tag=True):
    """Base of every message that crosses a socket: a frozen struct, tagged with its class name."""


class FrameCodec:
    """Encodes and checks frames of one socket's message union (e.g. `PeerRegister | KVDestination | ...`)."""

    def __init__(self, union: Any, secret: bytes | None, max_frame_bytes: int = MAX_FRAME_BYTES,
                 replay_window_s: float = REPLAY_WINDOW_S):
        envelope = msgspec.defstruct("Envelope", [("version", int), ("sent_at", float), ("nonce", bytes),
                                                  ("body", union)], frozen=True, array_like=True)
        self._envelope = envelope
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(envelope)
        self.secret = secret or None
        self.max_frame_bytes = max_frame_bytes
        self.replay_window_s = replay_window_s
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # nonce -> sent_at
        self.dropped: collections.Counter[str] = collections.Counter()  # reason -> frames dropped

    def encode(self, msg: WireMessage) -> list[bytes]:
        payload = self._encoder.encode(self._envelope(WIRE_VERSION, time.time(), os.urandom(NONCE_BYTES), msg))
        return [payload, self._mac(payload)]

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest() if self.secret else b""

    def decode(self, parts: list[bytes]) -> WireMessage | None:
        """The message, or None (dropped: logged and counted in `dropped`)."""
        if len(parts) != 2:
            return self._drop("parts", f"{len(parts)} parts, expected 2")
        payload, mac = parts
        if len(payload) > self.max_frame_bytes:
            return self._drop("size", f"{len(payload)} bytes > {self.max_frame_bytes}")
        if self.secret and not hmac.compare_digest(mac, self._mac(payload)):
            return self._drop("signature", "bad or missing signature (a peer without this deployment's secret?)")
        try:
            env = self._decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return self._drop("malformed", str(e)[:200])
        if env.version != WIRE_VERSION:
            return self._drop("version", f"wire version {env.version}, this build speaks {WIRE_VERSION}")
        if self.secret and not self._fresh(env.nonce, env.sent_at):
            return self._drop("replay", "stale, future-dated or repeated frame")
        return env.body

    def _fresh(self, nonce: bytes, sent_at: float) -> bool:
        now = time.time()
        while self._seen and next(iter(self._seen.values())) < now - self.replay_window_s:
            self._seen.popitem(last=False)  # nonces leave once their frames would be refused as stale anyway
        if abs(now - sent_at) > self.replay_window_s or nonce in self._seen:
            return False
        self._seen[nonce] = sent_at
        return True

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        logger.warning("control frame dropped (%s): %s", reason, detail)
        return None
