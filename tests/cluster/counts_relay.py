"""A relay between a prefill's counts publisher and the router, in a process of its own (so the
test's client threads cannot starve it): a misbehaving prefill or network built from the real one.

It rewrites each report by `mode`, can hold every message back by `delay_s` (in order, like a slow
network) and drop every `drop_every`-th report (what ZMQ PUB does silently to a slow subscriber).
For each dropped report it records when it would have been delivered and when the first heartbeat
naming it was delivered instead: the router can tell the report is lost from that moment.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import queue
import time

import msgspec
import numpy as np
import zmq

from sglang_eldr.server_process import free_port
from sglang_eldr.wire import COUNTS_TOPIC, Heartbeat, decode_message, decode_report, encode_report

MODES = ("pass", "negative", "wrong-shape", "short-bytes", "garbage", "unavailable")


def rewrite(mode: str, data: bytes) -> bytes:
    r = decode_report(data)
    counts = r.array()
    if mode == "negative":
        return encode_report(r.room, r.rid, -counts - 1, r.prompt_tokens)
    if mode == "wrong-shape":
        return encode_report(r.room, r.rid, np.ones((counts.shape[0] + 1, 3), np.int32), r.prompt_tokens)
    if mode == "short-bytes":
        return msgspec.msgpack.encode({**msgspec.structs.asdict(r), "counts": r.counts[:-4]})
    if mode == "garbage":
        return b"\xc1not msgpack"
    if mode == "unavailable":  # what a prefill says when its rows cannot be trusted (HiCache prefix)
        return encode_report(r.room, r.rid, None, r.prompt_tokens, "prefix loaded from the hierarchical cache")
    return data


def _run(host: str, upstream_port: int, port: int, mode, delay_s, drop_every, max_gap, stop, dropped) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
    sub.connect(f"tcp://{host}:{upstream_port}")
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://{host}:{port}")
    held: collections.deque[tuple[float, list[bytes], object]] = collections.deque()
    reports, last_beat = 0, None
    lost: dict[int, float] = {}  # dropped rooms no heartbeat has named yet
    while not stop.is_set():
        wait_ms = max(0, int((held[0][0] - time.monotonic()) * 1000)) if held else 100
        if sub.poll(wait_ms):
            topic, _, data = frames = sub.recv_multipart()
            now = time.monotonic()
            due = now + delay_s.value
            header, body = decode_message(frames)
            kind = header.kind
            if kind == "heartbeat":
                if last_beat is not None:
                    max_gap.value = max(max_gap.value, now - last_beat)
                last_beat = now
            elif kind == "counts":
                reports += 1
                if drop_every.value and reports % drop_every.value == 0:
                    room = decode_report(data).room
                    lost[room] = due
                    continue
                data = rewrite(MODES[mode.value], data)
            held.append((due, [topic, frames[1], data], body))
        while held and held[0][0] <= time.monotonic():
            _, out, body = held.popleft()
            pub.send_multipart(out)
            if isinstance(body, Heartbeat) and lost:
                now = time.monotonic()
                for room in [r for r in body.reported if r in lost]:
                    dropped.put((room, lost.pop(room), now))
    sub.close(0)
    pub.close(0)
    ctx.term()


class CountsRelay:
    def __init__(self, host: str, upstream_port: int):
        ctx = mp.get_context("spawn")
        self.port = free_port(host)
        self._mode = ctx.Value("i", 0)
        self._delay = ctx.Value("d", 0.0)
        self._drop_every = ctx.Value("i", 0)
        self._max_gap = ctx.Value("d", 0.0)
        self._stop = ctx.Event()
        self._dropped: mp.Queue = ctx.Queue()
        self._proc = ctx.Process(target=_run, daemon=True, args=(
            host, upstream_port, self.port, self._mode, self._delay, self._drop_every, self._max_gap,
            self._stop, self._dropped))
        self._proc.start()

    @property
    def mode(self) -> str:
        return MODES[self._mode.value]

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode.value = MODES.index(mode)

    def set(self, delay_s: float, drop_every: int) -> None:
        """Delays every message by `delay_s`, drops every `drop_every`-th report from now (0: none);
        resets the largest heartbeat gap seen."""
        self._delay.value, self._drop_every.value, self._max_gap.value = delay_s, drop_every, 0.0

    def dropped(self) -> dict[int, float]:
        """Rooms dropped (and named by a heartbeat since) since the last call, each with the seconds
        from when its report would have been delivered to when that heartbeat was."""
        out = {}
        while True:
            try:
                room, due, named = self._dropped.get_nowait()
            except queue.Empty:
                return out
            out[room] = named - due

    def max_heartbeat_gap(self) -> float:
        return self._max_gap.value

    def close(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
