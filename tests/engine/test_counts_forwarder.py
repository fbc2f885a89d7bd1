"""The counts hub runs in a process of its own: it keeps beating while its scheduler process holds
the GIL, it says why when it cannot bind, and it does not outlive a killed scheduler."""

from __future__ import annotations

import os
import random
import time

import pytest
import zmq

from orphans import assert_child_ends_with_parent

from sglang_eldr.engine import counts_publisher
from sglang_eldr.engine.counts_forwarder import HEARTBEAT_S
from sglang_eldr.server_process import free_port
from sglang_eldr.wire import COUNTS_TOPIC, Heartbeat, decode_message

HOST = "127.0.0.2"  # not the default loopback address: nothing may assume 127.0.0.1


def drain(sub: zmq.Socket) -> list[int]:
    """Sequence numbers of the heartbeats queued on `sub` now."""
    seqs = []
    while sub.poll(0):
        header, body = decode_message(sub.recv_multipart())
        if isinstance(body, Heartbeat):
            seqs.append(header.seq)
    return seqs


def test_heartbeats_keep_their_pace_while_the_scheduler_holds_the_gil(tmp_path):
    hub = counts_publisher.Publisher(HOST, 0, hub=True, port_file=str(tmp_path / "port"))
    hub.socket()
    try:
        assert hub.forwarder is not None and hub.forwarder.pid != os.getpid()
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
        sub.connect(hub.endpoint)
        deadline = time.monotonic() + 10
        while not drain(sub):  # PUB/SUB joins asynchronously
            assert time.monotonic() < deadline, "no heartbeat in 10 s"
            time.sleep(0.05)
        # One C call that holds the GIL throughout, as a busy scheduler's long steps do: a thread in
        # this process could not publish until it returns (measured: the old forwarder thread sent
        # 0-1 heartbeats in such a call). Only the heartbeats sent during the call are counted.
        keys = [random.random() for _ in range(3_000_000)]
        drain(sub)
        started = time.monotonic()
        sorted(keys)
        held = time.monotonic() - started
        beats = drain(sub)
        print(f"GIL held {held * 1e3:.0f} ms; {len(beats)} heartbeats meanwhile")
        assert held > 0.3, "the machine sorted too fast for this test to mean anything"
        assert len(beats) >= 0.5 * held / HEARTBEAT_S, (held, beats)
        sub.close(0)
    finally:
        hub.close()
    assert hub.forwarder.poll() is not None


def test_a_taken_port_is_a_clear_error():
    port = free_port(HOST)
    taken = zmq.Context.instance().socket(zmq.PUB)
    taken.bind(f"tcp://{HOST}:{port}")
    try:
        with pytest.raises(RuntimeError, match=f"cannot bind tcp://{HOST}:{port}"):
            counts_publisher.Publisher(HOST, port, hub=True).socket()
    finally:
        taken.close(0)


SCHEDULER = """
import sys, time
from sglang_eldr.engine import counts_publisher
hub = counts_publisher.Publisher(sys.argv[1], 0, hub=True)
hub.socket()
print(hub.forwarder.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_scheduler_leaves_no_forwarder_behind(tmp_path):
    script = tmp_path / "scheduler.py"
    script.write_text(SCHEDULER)
    assert_child_ends_with_parent(script, HOST, what="forwarder")
