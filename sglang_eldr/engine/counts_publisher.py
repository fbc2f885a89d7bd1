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
reports there and a proxy thread forwards them, so no two processes bind the counts port and each
rank reports its own requests. Other attention-TP ranks see the same requests and publish nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from typing import Any, Optional

import numpy as np
import zmq

from sglang_eldr.wire import COUNTS_TOPIC, encode_report

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

        def forward() -> None:
            try:
                zmq.proxy(pull, pub)
            except zmq.ContextTerminated:
                pass

        self._thread = threading.Thread(target=forward, name="eldr-counts-proxy", daemon=True)
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

    def send(self, payload: bytes) -> None:
        try:
            self.socket().send_multipart([COUNTS_TOPIC, payload], flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1
            logger.warning("ELDR counts publisher: send queue full, report dropped (the router falls back)")


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


def publish(req: Any, counts: Optional[np.ndarray], unavailable: Optional[str]) -> None:
    """Sends one request's report (its counts, or why there are none), from publishing ranks."""
    if _PUB is not None:
        _PUB.send(encode_report(req.bootstrap_room, req.rid, counts, len(req.origin_input_ids), unavailable))


def register(host: Optional[str], port: int, port_file: Optional[str] = None) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _CONFIG
    _CONFIG = (host, port, port_file)
    HookRegistry.register(T_SCHEDULER_INIT, scheduler_init_after, HookType.AFTER)
