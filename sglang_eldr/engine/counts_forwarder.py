"""The counts hub of one prefill server, as a process of its own: binds the server's PUB socket and
the local PULL socket the ranks push to, numbers and publishes what they push, and sends a
heartbeat every 50 ms and after each burst.

A process and not a thread of the scheduler: a busy scheduler process kept a forwarding thread from
running for 98–340 ms at a time (measured on the CPU cluster), and the router can only tell that a
report was lost when the next heartbeat arrives. The hub imports neither SGLang nor torch.

`python -m sglang_eldr.engine.counts_forwarder --host H --port P --ipc ENDPOINT --parent PID
[--port-file F]` prints `ready <port>` once both sockets are bound (P = 0: a port the OS picks),
or `error <reason>` and exits 2. It ends by itself within 50 ms of its parent ending.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import sys
import time
from typing import Literal

import msgspec
import zmq

from sglang_eldr.wire import encode_heartbeat, publisher_frames

HEARTBEAT_S = 0.05
RECENT_S = 1.0

_ROOMS = msgspec.msgpack.Decoder(list[int])


class Forwarder:
    """Publishes what the ranks push, numbered, and a heartbeat every 50 ms and after each burst."""

    def __init__(self, pull: zmq.Socket, pub: zmq.Socket):
        self.pull, self.pub = pull, pub
        self.sender = secrets.randbits(63)
        self.seq = 0
        self.recent: dict[str, collections.deque[tuple[float, int]]] = {
            "counts": collections.deque(), "started": collections.deque()}

    def publish(self, kind: Literal["counts", "started", "heartbeat"], body: bytes) -> None:
        self.seq += 1
        try:
            self.pub.send_multipart(publisher_frames(self.sender, self.seq, kind, body), flags=zmq.NOBLOCK)
        except zmq.Again:  # PUB never blocks in practice; the heartbeat names what this lost
            pass

    def heartbeat(self, now: float) -> None:
        for q in self.recent.values():
            while q and q[0][0] < now - RECENT_S:
                q.popleft()
        self.publish("heartbeat", encode_heartbeat(RECENT_S, [r for _, r in self.recent["counts"]],
                                                   [r for _, r in self.recent["started"]]))

    def forward(self, frames: list[bytes]) -> None:
        kind, rooms, body = frames
        name: Literal["counts", "started"] = "counts" if kind == b"counts" else "started"
        self.publish(name, body)
        t = time.monotonic()
        self.recent[name].extend((t, r) for r in _ROOMS.decode(rooms))

    def run(self, parent: int) -> None:
        """Until `parent` is no longer this process's parent."""
        next_beat = time.monotonic()
        while os.getppid() == parent:
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat(now)
                next_beat = now + HEARTBEAT_S
            if not self.pull.poll(max(1, int((next_beat - now) * 1000))):
                continue
            self.forward(self.pull.recv_multipart())
            for _ in range(255):  # the rest of the burst (bounded, so a steady stream still beats)
                if not self.pull.poll(0):
                    break
                self.forward(self.pull.recv_multipart())
            # A heartbeat right after each burst as well: a report dropped on the way is known lost then.
            now = time.monotonic()
            self.heartbeat(now)
            next_beat = now + HEARTBEAT_S


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bind(ctx: zmq.Context, host: str, port: int, ipc: str) -> tuple[zmq.Socket, zmq.Socket, int]:
    """(PULL, PUB, the PUB's port)."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    if ":" in host:
        pub.setsockopt(zmq.IPV6, 1)
    if port == 0:
        port = pub.bind_to_random_port(f"tcp://{bracket(host)}")
    else:
        pub.bind(f"tcp://{bracket(host)}:{port}")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(ipc)
    return pull, pub, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="address the PUB socket binds (the counts host)")
    parser.add_argument("--port", type=int, required=True, help="its port; 0 lets the OS pick one")
    parser.add_argument("--ipc", required=True, help="the local endpoint the scheduler ranks push to")
    parser.add_argument("--parent", type=int, required=True, help="end when this process is no longer the parent")
    parser.add_argument("--port-file", help="write the bound port here (atomically)")
    args = parser.parse_args(argv)
    ctx = zmq.Context()
    try:
        pull, pub, port = bind(ctx, args.host, args.port, args.ipc)
    except zmq.ZMQError as e:
        print(f"error cannot bind tcp://{bracket(args.host)}:{args.port} or {args.ipc}: {e}", flush=True)
        return 2
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(f"ready {port}", flush=True)
    Forwarder(pull, pub).run(args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
