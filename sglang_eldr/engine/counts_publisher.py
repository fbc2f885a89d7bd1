"""Prefill-server side of the ELDR PD protocol: publish each PD request's prompt expert counts.

`capture.prefill_result_before` calls :func:`publish` when a PD request's last prefill chunk has
run, before SGLang hands the KV to the transfer engine. Reports (`wire.CountsReport`, topic
`eldr-counts`) leave on one ZMQ PUB socket per server, bound to the counts host and port the server
was given (`launch_server --eldr-counts-host/--eldr-counts-port`; the host defaults to `--host`). By
default the port is 0: the OS picks a free one when the socket binds (so it can never collide with a
bootstrap or other port), and the publisher writes it to a file the HTTP process reads for
`GET /eldr/info`.

One socket per server, whatever the parallel layout: with DP attention every DP rank runs its own
scheduler process with its own requests. The scheduler of DP rank 0 (attention-TP rank 0) starts
the server's forwarder process (`counts_forwarder`), which owns the PUB socket and a PULL socket on
a local IPC path; every publishing rank, rank 0 included, PUSHes its reports there, so no two
processes bind the counts port and each rank reports its own requests. Other attention-TP ranks see
the same requests and publish nothing.

The forwarder numbers what it publishes (`wire.Header`) and sends a `wire.Heartbeat` every 50 ms,
and after each burst it forwards, naming the rooms it reported and started in the last second: ZMQ
PUB drops messages silently (a slow or reconnecting subscriber), and this is how the router learns
within 100 ms that a report it waits for was lost, that a request has started (its counts deadline
runs from then, so queueing never causes a fallback), and that the publisher is alive at all.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import select
import subprocess
import sys
import tempfile
from typing import Any, Literal, Optional

import msgspec
import numpy as np
import zmq

from sglang_eldr.engine.counts_forwarder import bracket
from sglang_eldr.wire import encode_report, encode_started

FORWARDER_START_S = 60.0

logger = logging.getLogger(__name__)


def ipc_endpoint(host: str, port: int, port_file: str | None = None) -> str:
    """The local endpoint the ranks of one server push to (short: IPC paths are limited to ~100 bytes)."""
    tag = hashlib.sha1(f"{host}:{port}:{port_file}".encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/eldr-counts-{tag}.ipc"


class Publisher:
    """Publishes reports for one scheduler process; `hub=True` for the process that starts the
    server's forwarder, which owns the PUB socket."""

    def __init__(self, host: str, port: int, hub: bool, port_file: str | None = None):
        self.host, self.port, self.port_file = host, port, port_file
        self.endpoint = f"tcp://{bracket(host)}:{port}"
        self.ipc = ipc_endpoint(host, port, port_file)
        self.hub = hub
        self._push: Optional[zmq.Socket] = None
        self.forwarder: Optional[subprocess.Popen[str]] = None
        self.sent = 0
        self.dropped = 0

    def _start_hub(self) -> None:
        cmd = [sys.executable, "-m", "sglang_eldr.engine.counts_forwarder", "--host", self.host,
               "--port", str(self.port), "--ipc", self.ipc, "--parent", str(os.getpid())]
        if self.port_file:
            cmd += ["--port-file", self.port_file]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], FORWARDER_START_S)
        line = proc.stdout.readline().strip() if ready else ""
        proc.stdout.close()
        if not line.startswith("ready "):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reason = line.removeprefix("error ") if line else f"no answer in {FORWARDER_START_S:.0f} s"
            raise RuntimeError(f"ELDR counts publisher: its forwarder process (exit status {proc.returncode}) "
                               f"did not start: {reason}")
        self.port = int(line.split()[1])
        self.endpoint = f"tcp://{bracket(self.host)}:{self.port}"
        self.forwarder = proc
        atexit.register(self.close)
        logger.info("ELDR counts publisher bound to %s by forwarder process %d (ranks push to %s)",
                    self.endpoint, proc.pid, self.ipc)

    def socket(self) -> zmq.Socket:
        # Started lazily in the scheduler process (the hook runs there; the HTTP process never binds).
        if self._push is None:
            if self.hub:
                self._start_hub()
            push: zmq.Socket = zmq.Context.instance().socket(zmq.PUSH)
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

    def close(self) -> None:
        """Stops the forwarder (it also ends by itself once this process has)."""
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.forwarder.wait(5)


_PACK = msgspec.msgpack.Encoder()


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
