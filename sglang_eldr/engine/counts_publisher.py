"""Prefill-server side of the ELDR PD protocol: publish each PD request's prompt expert counts.

A BEFORE hook on the PD prefill result processor (`process_batch_result_disagg_prefill`) runs when
a batch's prefill forward has ended and before SGLang hands the KV to the transfer engine and may
release it. For every request whose last prefill chunk just ran, the prompt's counts are reduced
from the signature table (through its KV slots, so radix-cache prefix hits are exact) and sent as a
`CountsReport` on a ZMQ PUB socket (topic `eldr-counts`) bound to 127.0.0.1:<counts port>. The load
balancer subscribes and picks the decoder as soon as the report lands (docs/protocol.md).
"""

from __future__ import annotations

import logging
from typing import Optional

import zmq

from sglang_eldr.engine import capture
from sglang_eldr.wire import COUNTS_TOPIC, encode_report

logger = logging.getLogger(__name__)

T_DISAGG_PREFILL_RESULT = (
    "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin.process_batch_result_disagg_prefill"
)


class _Publisher:
    def __init__(self, host: str, port: int):
        self.endpoint = f"tcp://{host}:{port}"
        self.sock: Optional[zmq.Socket] = None
        self.sent = 0

    def socket(self) -> zmq.Socket:
        # Bound lazily in the scheduler process (the hook runs there; the HTTP process never binds).
        if self.sock is None:
            self.sock = zmq.Context.instance().socket(zmq.PUB)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.SNDHWM, 100_000)
            self.sock.bind(self.endpoint)
            logger.info("ELDR counts publisher bound to %s", self.endpoint)
        return self.sock

    def send(self, payload: bytes) -> None:
        try:
            self.socket().send_multipart([COUNTS_TOPIC, payload], flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            logger.warning("ELDR counts publisher: send queue full, report dropped (router falls back to JSQ)")


_PUB: Optional[_Publisher] = None


def _ready(req) -> bool:
    return (
        getattr(req, "bootstrap_room", None) is not None
        and getattr(req, "inflight_middle_chunks", 0) <= 0
        and not getattr(req, "_eldr_published", False)
        and not req.finished()
    )


def disagg_prefill_result_before(scheduler, batch, result, *args, **kwargs):
    table = capture.get_table()
    if _PUB is None or table is None:
        return None
    todo = [r for r in batch.reqs if _ready(r)]
    if not todo:
        return None
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None:
        copy_done.synchronize()
    r2t = scheduler.req_to_token_pool.req_to_token
    try:
        counts = table.counts([r2t[r.kv.req_pool_idx, : len(r.origin_input_ids)] for r in todo]).cpu().numpy()
    except Exception as e:  # noqa: BLE001 - never break serving; the router falls back to JSQ
        logger.warning("ELDR: counts reduction failed (%s); no report for %d request(s)", e, len(todo))
        return None
    for req, c in zip(todo, counts):
        _PUB.send(encode_report(req.bootstrap_room, req.rid, c, len(req.origin_input_ids)))
        req._eldr_published = True
    return None


def register(host: str, port: int) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _PUB
    _PUB = _Publisher(host, port)
    HookRegistry.register(T_DISAGG_PREFILL_RESULT, disagg_prefill_result_before, HookType.BEFORE)
