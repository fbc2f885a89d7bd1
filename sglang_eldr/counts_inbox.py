"""Receives prefill expert counts (ZMQ SUB, one socket per prefill server) and hands each report
to the request waiting on its bootstrap room."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import zmq
import zmq.asyncio

from sglang_eldr.wire import COUNTS_TOPIC, CountsReport, decode_report

logger = logging.getLogger(__name__)


class CountsInbox:
    def __init__(self) -> None:
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._waiting: dict[int, asyncio.Future[CountsReport]] = {}
        self._task: asyncio.Task[None] | None = None
        self._endpoints: set[str] = set()
        self.received = 0
        self.malformed = 0
        self.unmatched = 0

    def connect(self, endpoint: str) -> None:
        if endpoint not in self._endpoints:
            self._sock.connect(endpoint)
            self._endpoints.add(endpoint)

    def disconnect(self, endpoint: str) -> None:
        if endpoint in self._endpoints:
            self._sock.disconnect(endpoint)
            self._endpoints.discard(endpoint)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="eldr-counts-inbox")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for fut in self._waiting.values():
            fut.cancel()
        self._sock.close(0)

    def expect(self, room: int) -> asyncio.Future[CountsReport]:
        """Registers interest in a room before its request is sent; call `forget` when done."""
        fut: asyncio.Future[CountsReport] = asyncio.get_running_loop().create_future()
        self._waiting[room] = fut
        return fut

    def forget(self, room: int) -> None:
        self._waiting.pop(room, None)

    async def _run(self) -> None:
        while True:
            try:
                frames = await self._sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                logger.warning("counts inbox receive failed: %s", e)
                await asyncio.sleep(0.05)
                continue
            try:
                self.deliver(frames)
            except Exception:  # noqa: BLE001 - one bad message must not stop every later delivery
                self.malformed += 1
                logger.exception("counts inbox: dropped a message that failed to deliver")

    def deliver(self, frames: list[bytes]) -> None:
        if len(frames) != 2 or frames[0] != COUNTS_TOPIC:
            self.malformed += 1
            logger.warning("counts inbox: dropped a message with %d frame(s)", len(frames))
            return
        try:
            report = decode_report(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.malformed += 1
            logger.warning("counts inbox: dropped a malformed report: %s", e)
            return
        self.received += 1
        fut = self._waiting.pop(report.room, None)
        if fut is None or fut.done():
            self.unmatched += 1
            return
        fut.set_result(report)
