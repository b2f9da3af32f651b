"""A multi-host harness for tests and benchmarks (tests/test_multihost.py, benchmarks/faults.py): each server in
its own Linux network namespace, joined to a bridge in the root namespace (where the router and the test client run) by a veth pair, so that HTTP, bootstrap,
ZMQ control and KV transfer traffic all cross a real (virtual) link with its own address.

Faults on a host's link:
- partition: `link_down(host)` takes its veth down (frames are dropped silently; TCP retransmits, then times out);
- rate limit: `rate_limit(host, "200mbit")` puts a tbf qdisc on both ends;
- delay, loss and stalls: a host created with `relay=True` is joined to the bridge through two veth pairs with a
  `FrameRelay` between them: a thread that forwards every Ethernet frame (AF_PACKET) after `delay_s`, dropping a
  `loss` fraction, and holding all frames while `stalled`. It sits on the link itself, so it sees every
  connection of the host whatever its port (this kernel has no netem: "Specified qdisc kind is unknown"; netem
  would do the same in the kernel). MTUs are 65535 so that the relay forwards whole TCP segments.

Needs root (CAP_NET_ADMIN) and `ip`; `skip_reason()` says why a machine cannot run it.
"""

from __future__ import annotations

import heapq
import os
import random
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

MTU = 65535
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_VNET_HDR = 263, 15


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def skip_reason() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    name = f"pdchk{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"this machine refuses network namespaces: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    root_if: str  # the root-namespace end of its link (the bridge port, or the relay's host side)
    relay: FrameRelay | None = None


class FrameRelay:
    """Forwards Ethernet frames between two interfaces, with a delay, a loss rate, and stalls (see module doc)."""

    def __init__(self, if_a: str, if_b: str, seed: int = 0) -> None:
        self.delay_s, self.loss, self.stalled = 0.0, 0.0, False
        self.forwarded = self.dropped = 0
        self._rng = random.Random(seed)
        self._socks = {}
        for name in (if_a, if_b):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
            # Frames carry a virtio_net_hdr both ways: a frame taken with its checksum still to compute (veth
            # offloads it) or as one large segment is sent on with that work still to do, and the kernel does it.
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.bind((name, 0))
            s.setblocking(False)
            self._socks[name] = s
        (a, sa), (b, sb) = self._socks.items()
        self._other = {sa: sb, sb: sa}
        self._queue: list[tuple[float, int, socket.socket, bytes]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-relay", daemon=True)
        self._thread.start()

    def set(self, delay_s: float = 0.0, loss: float = 0.0) -> None:
        self.delay_s, self.loss = delay_s, loss

    def _run(self) -> None:
        socks = list(self._other)
        while not self._stop.is_set():
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now and not self.stalled:
                _, _, out, frame = heapq.heappop(self._queue)
                try:
                    out.send(frame)
                    self.forwarded += 1
                except OSError:
                    self.dropped += 1
            wait = 0.05 if not self._queue or self.stalled else max(0.0, self._queue[0][0] - now)
            ready, _, _ = select.select(socks, [], [], min(wait, 0.05))
            for s in ready:
                for _ in range(256):  # bounded: the queue gets a turn
                    try:
                        frame, addr = s.recvfrom(MTU + 64)
                    except BlockingIOError:
                        break
                    if addr[2] == PACKET_OUTGOING:
                        continue  # what this relay itself sent out of the interface
                    if self.loss and self._rng.random() < self.loss:
                        self.dropped += 1
                        continue
                    self._seq += 1
                    heapq.heappush(self._queue, (time.monotonic() + self.delay_s, self._seq, self._other[s], frame))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self._socks.values():
            s.close()


class Network:
    """A bridge (the root namespace is HOST .1 on it) and the hosts joined to it; `close()` removes all."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.subnet = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
        self.bridge = f"pdb{self.tag}"
        self.ip = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        self._links: list[str] = []  # root-namespace interfaces to delete
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "mtu", str(MTU))
        _ip("addr", "add", f"{self.ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def _veth(self, root_end: str, other_end: str, other_netns: str | None) -> None:
        """A veth pair; `other_end` moved into `other_netns` (and named there) when given."""
        peer = other_end if other_netns is None else f"pt{self.tag}{len(self._links)}"
        _ip("link", "add", root_end, "mtu", str(MTU), "type", "veth", "peer", "name", peer, "mtu", str(MTU))
        self._links.append(root_end)
        if other_netns is not None:
            _ip("link", "set", peer, "netns", other_netns)
            _ip("link", "set", peer, "name", other_end, netns=other_netns)

    def add_host(self, name: str, relay: bool = False) -> Host:
        index = len(self.hosts) + 2
        ns = f"pd{self.tag}{name}"
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", netns=ns)
        host_side = f"pv{self.tag}{index}"
        self._veth(host_side, "eth0", ns)
        _ip("addr", "add", f"{self.subnet}.{index}/24", "dev", "eth0", netns=ns)
        _ip("link", "set", "eth0", "up", netns=ns)
        _ip("route", "add", "default", "via", self.ip, netns=ns)
        bridge_port, frame_relay = host_side, None
        if relay:  # host_side <-> relay <-> relay_side ~ bridge_port (a second veth pair)
            relay_side, bridge_port = f"pr{self.tag}{index}", f"pq{self.tag}{index}"
            self._veth(relay_side, bridge_port, None)
            for dev in (host_side, relay_side):
                _ip("link", "set", dev, "promisc", "on")
                _ip("link", "set", dev, "up")
            frame_relay = FrameRelay(host_side, relay_side, seed=index)
        _ip("link", "set", bridge_port, "master", self.bridge)
        _ip("link", "set", bridge_port, "up")
        host = Host(name, ns, f"{self.subnet}.{index}", host_side, frame_relay)
        self.hosts.append(host)
        return host

    def link_down(self, host: Host) -> None:
        _ip("link", "set", host.root_if, "down")

    def link_up(self, host: Host) -> None:
        _ip("link", "set", host.root_if, "up")

    def rate_limit(self, host: Host, rate: str) -> None:
        for dev, ns in ((host.root_if, None), ("eth0", host.netns)):
            subprocess.run(["tc", *(["-n", ns] if ns else []), "qdisc", "replace", "dev", dev, "root", "tbf",
                            "rate", rate, "burst", "256kb", "latency", "100ms"], check=True, capture_output=True,
                           timeout=30)

    def close(self) -> None:
        for h in self.hosts:
            if h.relay is not None:
                h.relay.close()
            _ip("netns", "del", h.netns, check=False)
        for dev in self._links:
            _ip("link", "del", dev, check=False)
        _ip("link", "del", self.bridge, check=False)
