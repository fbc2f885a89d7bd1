"""Prefill-server side of the ELDR PD protocol: publish each PD request's prompt expert counts.

`capture.prefill_result_before` calls :func:`publish` when a PD request's last prefill chunk has
run, before SGLang hands the KV to the transfer engine. Reports (`wire.CountsReport`, topic
`eldr-counts`) leave on one ZMQ PUB socket per server, bound to the counts host and port the server
was given (`launch_server --eldr-counts-host/--eldr-counts-port`; the host defaults to `--host`). By
default the port is 0: the OS picks a free one when the socket binds (so it can never collide with a
bootstrap or other port), and the publisher writes it to a file the HTTP process reads for
`GET /eldr/info`.

One socket per server, whatever the parallel layout: with DP attention every DP rank runs its own
scheduler process with its own requests. The scheduler of DP rank 0 (attention-TP rank 0) owns the
PUB socket and a PULL socket on a local IPC path; every publishing rank, rank 0 included, PUSHes its
reports there and the hub's forwarding thread publishes them, so no two processes bind the counts
port and each rank reports its own requests. Other attention-TP ranks see the same requests and
publish nothing.

The forwarding thread numbers what it publishes (`wire.Header`) and sends a `wire.Heartbeat` every
50 ms, and after each burst it forwards, naming the rooms it reported and started in the last second: ZMQ PUB drops messages silently
(a slow or reconnecting subscriber), and this is how the router learns within 100 ms that a report
it waits for was lost, that a request has started (its counts deadline runs from then, so queueing
never causes a fallback), and that the publisher is alive at all.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from typing import Any, Literal, Optional

import msgspec
import numpy as np
import zmq

from sglang_eldr.wire import encode_heartbeat, encode_report, encode_started, publisher_frames

HEARTBEAT_S = 0.05
RECENT_S = 1.0

logger = logging.getLogger(__name__)


def ipc_endpoint(host: str, port: int, port_file: str | None = None) -> str:
    """The local endpoint the ranks of one server push to (short: IPC paths are limited to ~100 bytes)."""
    tag = hashlib.sha1(f"{host}:{port}:{port_file}".encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/eldr-counts-{tag}.ipc"


class Publisher:
    """Publishes reports for one scheduler process; `hub=True` for the process that owns the PUB."""

    def __init__(self, host: str, port: int, hub: bool, port_file: str | None = None):
        self.host, self.port, self.port_file = host, port, port_file
        self.endpoint = f"tcp://{_bracket(host)}:{port}"
        self.ipc = ipc_endpoint(host, port, port_file)
        self.hub = hub
        self._push: Optional[zmq.Socket] = None
        self._thread: Optional[threading.Thread] = None
        self.sent = 0
        self.dropped = 0

    def _start_hub(self, ctx: zmq.Context) -> None:
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        if ":" in self.host:
            pub.setsockopt(zmq.IPV6, 1)
        if self.port == 0:
            self.port = pub.bind_to_random_port(f"tcp://{_bracket(self.host)}")
            self.endpoint = f"tcp://{_bracket(self.host)}:{self.port}"
        else:
            pub.bind(self.endpoint)
        if self.port_file:
            tmp = self.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(self.port))
            os.replace(tmp, self.port_file)
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self.ipc)
        self._thread = threading.Thread(target=Forwarder(pull, pub).run, name="eldr-counts-forwarder", daemon=True)
        self._thread.start()
        logger.info("ELDR counts publisher bound to %s (ranks push to %s)", self.endpoint, self.ipc)

    def socket(self) -> zmq.Socket:
        # Bound lazily in the scheduler process (the hook runs there; the HTTP process never binds).
        if self._push is None:
            ctx: zmq.Context = zmq.Context.instance()
            if self.hub:
                self._start_hub(ctx)
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDHWM, 100_000)
            push.connect(self.ipc)
            self._push = push
        return self._push

    def send(self, kind: Literal["counts", "started"], rooms: list[int], body: bytes) -> None:
        """Hands one message to the hub: `rooms` are the bootstrap rooms it is about."""
        try:
            self.socket().send_multipart([kind.encode(), _PACK.encode(rooms), body], flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1
            logger.warning("ELDR counts publisher: send queue full, message dropped (the router falls back)")


_PACK = msgspec.msgpack.Encoder()
_ROOMS = msgspec.msgpack.Decoder(list[int])


class Forwarder:
    """The hub's thread: publishes what the ranks push, numbered, and a heartbeat every 50 ms and
    after each burst."""

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

    def run(self) -> None:
        next_beat = time.monotonic()
        try:
            while True:
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
                # A heartbeat right after each burst as well: a report dropped on the way is known lost
                # then, even when this thread was kept from running on time (a busy scheduler process).
                now = time.monotonic()
                self.heartbeat(now)
                next_beat = now + HEARTBEAT_S
        except zmq.ContextTerminated:
            pass


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_PUB: Optional[Publisher] = None
_CONFIG: Optional[tuple[Optional[str], int, Optional[str]]] = None  # host (None: the server's), port, port file


def _rank(ctx: Any, *names: str) -> int:
    for name in names:
        try:
            v = getattr(ctx, name)
        except Exception:  # noqa: BLE001 - SGLang raises for ranks that were never published
            continue
        if isinstance(v, int):
            return v
    return 0


def ranks_role(parallel: Any) -> tuple[bool, bool]:
    """(publishes, owns the PUB socket) for the scheduler process whose ranks `parallel` holds."""
    publishes = _rank(parallel, "attn_tp_rank") == 0 and _rank(parallel, "pp_rank") == 0
    return publishes, publishes and _rank(parallel, "attn_dp_rank", "dp_rank") == 0


T_SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
# Forms each prefill batch (every scheduler loop, PD prefill loops included): its requests have left
# the bootstrap and waiting queues and are about to run.
T_NEW_PREFILL_BATCH = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"


def active() -> bool:
    return _CONFIG is not None


def scheduler_init_after(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Each scheduler process decides its part once; the hub binds at once, so ranks that publish
    before it ever has a request of its own are heard."""
    global _PUB
    if _CONFIG is None or _PUB is not None:
        return None
    from sglang.srt.runtime_context import get_parallel

    publishes, hub = ranks_role(get_parallel())
    if publishes:
        host, port, port_file = _CONFIG
        # No --eldr-counts-host: bind where the server itself serves (SGLang's resolved --host).
        _PUB = Publisher(host or scheduler.server_args.host, port, hub=hub, port_file=port_file)
        _PUB.socket()
    return None


def new_prefill_batch_after(plan: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Every prefill batch says which PD requests it computes: a chunked prompt in each batch that
    runs one of its chunks, so the router's deadline runs from the latest progress."""
    batch = getattr(plan, "batch_to_run", None)
    if _PUB is None or batch is None:
        return None
    publish_started([int(r.bootstrap_room) for r in batch.reqs if getattr(r, "bootstrap_room", None) is not None])
    return None


def publish(req: Any, counts: Optional[np.ndarray], unavailable: Optional[str]) -> None:
    """Sends one request's report (its counts, or why there are none), from publishing ranks."""
    if _PUB is not None:
        room = int(req.bootstrap_room)
        _PUB.send("counts", [room], encode_report(room, req.rid, counts, len(req.origin_input_ids), unavailable))


def publish_started(rooms: list[int]) -> None:
    """Says that these PD requests' prefill is running now (one message per batch)."""
    if _PUB is not None and rooms:
        _PUB.send("started", rooms, encode_started(rooms))


def register(host: Optional[str], port: int, port_file: Optional[str] = None) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _CONFIG
    _CONFIG = (host, port, port_file)
    HookRegistry.register(T_SCHEDULER_INIT, scheduler_init_after, HookType.AFTER)
    HookRegistry.register(T_NEW_PREFILL_BATCH, new_prefill_batch_after, HookType.AFTER)
