"""Receives what the prefill servers publish (ZMQ SUB, one socket per prefill) and settles each
waiting request's counts: the report, or the reason to route without one.

A room waits until one of these happens (the request path also stops waiting if the prefill's HTTP
call ends first):
* its `CountsReport` arrives: the counts (or the prefill's reason for having none);
* a heartbeat lists it as reported but no report came: `"counts-lost"` (at the next heartbeat the
  publisher gets to send: it sends one every 50 ms and after each burst it forwards);
* `deadline_s` passes after the prefill last ran a chunk of it (a `Started` message; a heartbeat
  naming it stands in for a lost one), or after it was sent while the publisher is silent (no
  message for `deadline_s`, or never heard from): `"counts-timeout"`. A request queued on a live
  prefill, before or between its chunks, never times out here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from sglang_eldr.wire import COUNTS_TOPIC, BodyError, CountsReport, Header, Heartbeat, Started, decode_message

logger = logging.getLogger(__name__)

Outcome = CountsReport | str  # a report, or the fallback reason
TICK_S = 0.05


@dataclass
class Channel:
    """One prefill's publisher, as this router hears it."""

    endpoint: str
    sock: zmq.asyncio.Socket
    task: asyncio.Task[None] | None = None
    sender: int | None = None
    seq: int = 0
    heard: float | None = None  # monotonic time of its last message
    rooms: set[int] = field(default_factory=set)  # waiting rooms sent to this prefill


@dataclass
class Waiting:
    channel: Channel
    sent: float
    future: asyncio.Future[Outcome]
    started: float | None = None
    timer: asyncio.TimerHandle | None = None


class CountsInbox:
    def __init__(self, deadline_s: float = 5.0) -> None:
        self.deadline_s = deadline_s
        self._ctx = zmq.asyncio.Context.instance()
        self._channels: dict[str, Channel] = {}
        self._waiting: dict[int, Waiting] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._running = False
        self.received = 0  # counts reports
        self.malformed = 0
        self.unmatched = 0  # reports for rooms nobody here waits for (other routers', late ones)
        self.gaps = 0  # messages the sequence numbers say were lost
        self.lost = 0  # waiting rooms settled "counts-lost"

    # ------------------------------------------------------------------ subscriptions
    def connect(self, endpoint: str) -> None:
        if endpoint in self._channels:
            return
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
        sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(endpoint)
        ch = self._channels[endpoint] = Channel(endpoint, sock)
        if self._running:
            ch.task = asyncio.create_task(self._run(ch), name=f"eldr-counts {endpoint}")

    def disconnect(self, endpoint: str) -> None:
        ch = self._channels.pop(endpoint, None)
        if ch is None:
            return
        if ch.task is not None:
            ch.task.cancel()
        ch.sock.close(0)
        for room in list(ch.rooms):
            self._settle(room, "counts-timeout")

    def start(self) -> None:
        self._running = True
        for ch in self._channels.values():
            ch.task = asyncio.create_task(self._run(ch), name=f"eldr-counts {ch.endpoint}")
        self._ticker = asyncio.create_task(self._tick(), name="eldr-counts-deadlines")

    async def close(self) -> None:
        self._running = False
        tasks = [t for t in [self._ticker, *(ch.task for ch in self._channels.values())] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in self._waiting.values():
            w.future.cancel()
        for ch in self._channels.values():
            ch.sock.close(0)
        self._channels.clear()

    # ------------------------------------------------------------------ waiting rooms
    def expect(self, room: int, endpoint: str) -> asyncio.Future[Outcome]:
        """Registers interest in a room before its request is sent to the prefill publishing on
        `endpoint` (which the fleet has subscribed to); call `forget` when done."""
        ch = self._channels[endpoint]
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[room] = Waiting(ch, time.monotonic(), fut)
        ch.rooms.add(room)
        return fut

    def forget(self, room: int) -> None:
        w = self._waiting.pop(room, None)
        if w is not None:
            w.channel.rooms.discard(room)
            if w.timer is not None:
                w.timer.cancel()

    def _settle(self, room: int, outcome: Outcome) -> bool:
        w = self._waiting.get(room)
        if w is None or w.future.done():
            return False
        w.future.set_result(outcome)
        self.forget(room)
        return True

    def _started(self, room: int, now: float, again: bool) -> None:
        """The prefill runs (a chunk of) this room now; `again` re-arms the deadline if it was armed."""
        w = self._waiting.get(room)
        if w is None or (w.started is not None and not again):
            return
        if w.timer is not None:
            w.timer.cancel()
        w.started = now
        w.timer = asyncio.get_running_loop().call_later(self.deadline_s, self._settle, room, "counts-timeout")

    async def _tick(self) -> None:
        """Times out rooms whose publisher is silent (or was never heard) past the deadline."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for ch in self._channels.values():
                if ch.heard is not None and now - ch.heard <= self.deadline_s:
                    continue
                for room in [r for r in ch.rooms if self._waiting[r].started is None
                             and now - self._waiting[r].sent > self.deadline_s]:
                    self._settle(room, "counts-timeout")

    # ------------------------------------------------------------------ messages
    async def _run(self, ch: Channel) -> None:
        while True:
            try:
                frames = await ch.sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                logger.warning("counts inbox: receive from %s failed: %s", ch.endpoint, e)
                await asyncio.sleep(0.05)
                continue
            try:
                self.deliver(ch, frames)
            except Exception:  # noqa: BLE001 - one bad message must not stop every later delivery
                self.malformed += 1
                logger.exception("counts inbox: dropped a message that failed to deliver")

    def deliver(self, ch: Channel, frames: list[bytes]) -> None:
        now = time.monotonic()
        try:
            header, body = decode_message(frames)
        except BodyError as e:
            self._heard(ch, e.header, now)
            self.malformed += 1
            logger.warning("counts inbox: dropped a malformed %s message from %s: %s", e.header.kind, ch.endpoint, e)
            return
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            self.malformed += 1
            logger.warning("counts inbox: dropped a malformed message from %s: %s", ch.endpoint, e)
            return
        self._heard(ch, header, now)
        if isinstance(body, CountsReport):
            self.received += 1
            if not self._settle(body.room, body):
                self.unmatched += 1
        elif isinstance(body, Started):
            for room in ch.rooms.intersection(body.rooms):
                self._started(room, now, again=True)
        elif isinstance(body, Heartbeat):
            # A heartbeat names a second's worth of rooms, most of them settled or another router's:
            # only the rooms waiting here are looked at (a C-level set intersection).
            for room in ch.rooms.intersection(body.started):
                self._started(room, now, again=False)
            for room in ch.rooms.intersection(body.reported):
                if self._settle(room, "counts-lost"):
                    self.lost += 1
                    logger.warning("counts inbox: the report for room %d from %s was lost", room, ch.endpoint)

    def _heard(self, ch: Channel, header: Header, now: float) -> None:
        if header.sender != ch.sender:
            if ch.sender is not None:
                logger.info("counts publisher at %s restarted", ch.endpoint)
            ch.sender, ch.seq = header.sender, header.seq
        else:
            if header.seq > ch.seq + 1:
                self.gaps += header.seq - ch.seq - 1
            ch.seq = max(ch.seq, header.seq)
        ch.heard = now
