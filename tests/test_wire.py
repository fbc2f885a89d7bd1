"""The counts message and the router's request validation, under fuzzed input."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from sglang_eldr.counts_inbox import CountsInbox
from sglang_eldr.request_validation import validate_body
from sglang_eldr.wire import (COUNTS_TOPIC, decode_report, encode_heartbeat, encode_report, encode_started,
                              publisher_frames)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def test_report_round_trip():
    counts = np.arange(12, dtype=np.int64).reshape(3, 4)
    r = decode_report(encode_report(7, "rid-1", counts, 40))
    assert (r.room, r.rid, r.prompt_tokens) == (7, "rid-1", 40)
    np.testing.assert_array_equal(r.array(), counts)


def test_invalid_utf8_in_a_key_is_a_decode_error():
    # Found by the fuzzer: msgspec raised UnicodeDecodeError, which would have ended the inbox loop.
    with pytest.raises(msgspec.DecodeError):
        decode_report(b"\x81\xa5\x00\x00\x00\x00\x80")


@given(st.binary(max_size=200))
def test_decoder_rejects_garbage_cleanly(data):
    try:
        r = decode_report(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    try:
        r.array()
    except ValueError:
        pass


@given(st.integers(-3, 5), st.integers(-3, 5), st.binary(max_size=64))
def test_inconsistent_shapes_are_value_errors(layers, experts, payload):
    msg = msgspec.msgpack.encode(
        {"room": 1, "rid": "x", "layers": layers, "experts": experts, "counts": payload, "prompt_tokens": 1}
    )
    r = decode_report(msg)
    if layers > 0 and experts > 0 and len(payload) == 4 * layers * experts:
        assert r.array().shape == (layers, experts)
    else:
        with pytest.raises(ValueError, match="counts report"):
            r.array()


@given(st.sampled_from(["/generate", "/v1/completions", "/v1/chat/completions"]), json_values)
def test_validate_body_never_raises(path, body):
    result = validate_body(path, body)
    assert result is None or isinstance(result, str)


def test_validate_body_messages():
    assert validate_body("/generate", {"text": "hi"}) is None
    assert "JSON object" in validate_body("/generate", [1, 2])
    assert "needs 'text'" in validate_body("/generate", {"rid": "x"})
    assert "unknown field 'prompt'" in validate_body("/generate", {"prompt": "x"})
    assert "batched" in validate_body("/generate", {"text": ["a", "b"]})
    assert "'stream' must be a boolean" in validate_body("/generate", {"text": "a", "stream": "yes"})
    assert "set by the router" in validate_body("/generate", {"text": "a", "bootstrap_room": 3})
    assert "'messages'" in validate_body("/v1/chat/completions", {"messages": []})


def test_more_than_one_choice_is_refused_before_any_server_work():
    chat = {"messages": [{"role": "user", "content": "a"}]}
    assert "'n' = 2" in validate_body("/v1/completions", {"prompt": "a", "n": 2})
    assert "'best_of' = 3" in validate_body("/v1/completions", {"prompt": "a", "best_of": 3})
    assert "'n' = 4" in validate_body("/v1/chat/completions", {**chat, "n": 4})
    assert "'sampling_params.n' = 2" in validate_body("/generate", {"text": "a", "sampling_params": {"n": 2}})
    assert "positive integer" in validate_body("/v1/completions", {"prompt": "a", "n": "2"})
    assert "positive integer" in validate_body("/generate", {"text": "a", "sampling_params": {"n": 0}})
    for path, body in (("/v1/completions", {"prompt": "a", "n": 1, "best_of": 1}), ("/v1/chat/completions", chat),
                       ("/v1/chat/completions", {**chat, "n": None}),
                       ("/generate", {"text": "a", "sampling_params": {"n": 1}})):
        assert validate_body(path, body) is None, (path, body)


class FakePublisher:
    """A PUB socket speaking the publisher's wire format, with a hand-driven sequence (the real
    publisher's forwarder is tested in tests/engine/test_reduction.py)."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.sender, self.seq = 99, 0

    def send(self, kind, body: bytes, skip: bool = False) -> None:
        self.seq += 1
        if not skip:  # a lost message still used up its number
            self.sock.send_multipart(publisher_frames(self.sender, self.seq, kind, body))

    def report(self, room: int, skip: bool = False) -> None:
        self.send("counts", encode_report(room, f"r{room}", np.eye(2), 2), skip)

    def heartbeat(self, reported=(), started=()) -> None:
        self.send("heartbeat", encode_heartbeat(1.0, list(reported), list(started)))


def run_inbox(scenario, deadline_s: float = 5.0):
    async def main():
        pub = FakePublisher()
        inbox = CountsInbox(deadline_s)
        inbox.connect(pub.endpoint)
        inbox.start()
        try:
            for _ in range(100):  # until the SUB has joined
                pub.heartbeat()
                await asyncio.sleep(0.02)
                if inbox._channels[pub.endpoint].heard is not None:
                    break
            await scenario(pub, inbox)
        finally:
            await inbox.close()
            pub.sock.close(0)

    asyncio.run(main())


def test_inbox_delivers_over_real_zmq_and_counts_bad_messages():
    async def scenario(pub, inbox):
        fut = inbox.expect(42, pub.endpoint)
        pub.sock.send_multipart([COUNTS_TOPIC, b"\x00garbage"])
        pub.sock.send_multipart(publisher_frames(1, 1, "counts", b"\xc1"))
        pub.report(41)
        pub.report(42)
        report = await asyncio.wait_for(fut, 5)
        assert report.rid == "r42"
        np.testing.assert_array_equal(report.array(), np.eye(2, dtype=np.int32))
        assert inbox.malformed == 2 and inbox.unmatched == 1 and inbox.received == 2

    run_inbox(scenario)


def test_a_lost_report_is_settled_at_the_next_heartbeat_and_the_gap_counted():
    async def scenario(pub, inbox):
        fut = inbox.expect(7, pub.endpoint)
        pub.send("started", encode_started([7]))
        pub.report(7, skip=True)
        await asyncio.sleep(0.1)
        assert not fut.done()
        pub.heartbeat(reported=[7], started=[7])
        assert await asyncio.wait_for(fut, 1) == "counts-lost"
        assert inbox.lost == 1 and inbox.gaps == 1

    run_inbox(scenario)


def test_the_deadline_runs_from_the_start_not_from_sending():
    """A room queued on a live prefill (heartbeats, no start) never times out; once started it
    does, `deadline_s` later. A started message lost is recovered from the heartbeat."""
    async def scenario(pub, inbox):
        fut = inbox.expect(5, pub.endpoint)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() - t0 < 0.6:  # 2x the deadline, queued
            pub.heartbeat()
            await asyncio.sleep(0.05)
        assert not fut.done()
        pub.send("started", encode_started([5]), skip=True)
        pub.heartbeat(started=[5])
        started = loop.time()
        while not fut.done():
            pub.heartbeat(started=[5])
            await asyncio.sleep(0.02)
        assert fut.result() == "counts-timeout"
        assert 0.25 <= loop.time() - started <= 0.5

    run_inbox(scenario, deadline_s=0.3)


def test_a_silent_publisher_times_out_rooms_from_sending():
    async def scenario(pub, inbox):
        loop = asyncio.get_running_loop()
        fut = inbox.expect(9, pub.endpoint)
        t0 = loop.time()
        assert await asyncio.wait_for(fut, 2) == "counts-timeout"
        assert 0.25 <= loop.time() - t0 <= 0.6

    run_inbox(scenario, deadline_s=0.3)


def test_a_restarted_publisher_is_a_new_sender_not_a_gap():
    async def scenario(pub, inbox):
        last = inbox._channels[pub.endpoint].seq
        pub.seq = 1000
        pub.heartbeat()
        await asyncio.sleep(0.1)
        assert inbox.gaps == 1000 - last  # the jump is a gap
        pub.sender, pub.seq = 123, 0  # the restart starts again from 1: not a gap
        fut = inbox.expect(3, pub.endpoint)
        pub.report(3)
        assert (await asyncio.wait_for(fut, 1)).room == 3
        assert inbox.gaps == 1000 - last

    run_inbox(scenario)


REPORT_KEYS = ["room", "rid", "layers", "experts", "counts", "prompt_tokens", "extra"]
msgpack_values = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) \
    | st.binary(max_size=64) | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)


@given(st.dictionaries(st.sampled_from(REPORT_KEYS), msgpack_values, max_size=7))
def test_near_valid_counts_messages_decode_or_fail_cleanly(fields):
    """Structured fuzz: maps with the report's own keys and any values. The router only ever sees
    a report whose array() is consistent, or a DecodeError/ValidationError/ValueError."""
    try:
        r = decode_report(msgspec.msgpack.encode(fields))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    try:
        a = r.array()
    except ValueError:
        return
    assert a.shape == (r.layers, r.experts) and a.dtype == np.dtype("<i4")


@given(st.binary(max_size=200) | json_values.map(lambda v: msgspec.json.encode(v)))
def test_worker_spec_decoding_never_raises_anything_else(data):
    from sglang_eldr.wire import WorkerSpec

    try:
        spec = msgspec.json.decode(data, type=WorkerSpec).checked()
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return
    assert spec.role in ("prefill", "decode") and spec.url.startswith("http")


def test_worker_spec_errors_name_the_field():
    from sglang_eldr.wire import WorkerSpec

    def err(body: dict) -> str:
        with pytest.raises((msgspec.ValidationError, ValueError)) as e:
            msgspec.json.decode(msgspec.json.encode(body), type=WorkerSpec).checked()
        return str(e.value)

    assert "bootstrap_port" in err({"url": "http://h:1", "role": "prefill"})
    assert "url" in err({"url": "h:1", "role": "decode"})
    assert "role" in err({"url": "http://h:1", "role": "both"})
    assert "weight" in err({"url": "http://h:1", "role": "decode", "weight": 1})
    assert "counts_port" in err({"url": "http://h:1", "role": "prefill", "bootstrap_port": 8998, "counts_port": 70000})
    ok = msgspec.json.decode(b'{"url": "http://h:1/", "role": "prefill", "bootstrap_port": 8998}', type=WorkerSpec)
    # No counts port: the router asks the prefill where it publishes (GET /eldr/info).
    assert ok.checked() == WorkerSpec(url="http://h:1", role="prefill", bootstrap_port=8998, counts_port=None)
    assert "counts_host" in err({"url": "http://h:1", "role": "prefill", "bootstrap_port": 8998, "counts_host": "h"})
    assert "counts_host" in err({"url": "http://h:1", "role": "decode", "counts_host": "h"})
