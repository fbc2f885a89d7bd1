"""Failure semantics with real processes: servers of the test cluster are SIGKILLed or SIGSTOPped
while the router serves, and restarted afterwards so the cluster is whole for the next test."""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
import requests
import zmq

from sglang_eldr.launch_cluster import free_port
from sglang_eldr.wire import COUNTS_TOPIC, decode_message, decode_report, encode_report

from .conftest import EVAL, HOST, rows
from .counts_relay import CountsRelay
from .helpers import all_idle, decode_rows, open_stream, server_busy, wait_for, workers

def prompt(i: int = 0) -> str:
    return rows(EVAL)[i]["text"]


def generate(url: str, text: str, **params) -> requests.Response:
    return requests.post(url + "/generate", json={
        "text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 8, **params}}, timeout=120)


def test_decoder_killed_mid_stream_then_requests_are_rerouted(cluster, centroids):
    """kill -9 of the decoder serving a stream: the client gets an error event and the stream ends
    (no hang). Requests the router then sends to the dead decoder are re-routed to the live one
    (the prefill still holds their KV). After a restart the decoder is put back in service."""
    # Checks every second but never enough failures to open the breaker: only requests open it,
    # and the first passing check after the restart closes it again.
    router = cluster.start_router(policy="rr", extra=["--health-interval", "1", "--health-failures", "1000"])
    stream = open_stream(router.url, prompt(0))
    route = json.loads(stream.headers["X-ELDR-Route"])
    victim = next(d for d in cluster.decoders if d.url == route["decoder"])
    survivor = next(d for d in cluster.decoders if d is not victim)
    lines = stream.iter_lines()
    first = [next(lines) for _ in range(3)]
    assert all(l.startswith(b"data:") for l in first if l)
    cluster.kill(victim)
    started = time.monotonic()
    rest = [l for l in lines if l]
    assert time.monotonic() - started < 30
    last = json.loads(rest[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == 502 and "mid-stream" in last["error"]["message"], rest[-3:]

    outs = [generate(router.url, prompt(i)) for i in (1, 2)]
    assert [o.status_code for o in outs] == [200, 200], [o.text for o in outs]
    routes = [o.json()["meta_info"]["eldr_route"] for o in outs]
    assert all(r["decoder"] == survivor.url for r in routes)
    assert [r["fallback"] for r in routes].count("decoder-unreachable") == 1, routes
    assert [w["healthy"] for w in decode_rows(router.url) if w["url"] == victim.url] == [False]
    assert all_idle(router.url)
    metrics = requests.get(router.url + "/metrics", timeout=5).text
    assert 'eldr_fallbacks_total{reason="decoder-unreachable"} 1.0' in metrics

    cluster.restart(victim)
    wait_for(lambda: all(w["healthy"] for w in decode_rows(router.url)), 30, "the restarted decoder back in service")
    used = {generate(router.url, prompt(i)).json()["meta_info"]["eldr_route"]["decoder"] for i in (3, 4)}
    assert used == {victim.url, survivor.url}
    assert all_idle(router.url)


def test_stopped_decoder_is_taken_out_by_health_checks_and_put_back(cluster, centroids):
    """SIGSTOP: the decoder accepts connections but never answers. Failed checks open its breaker,
    requests go to the other decoder, and SIGCONT closes the breaker again. (SGLang's /health runs
    a one-token generation and takes at least a second, hence the 4 s check timeout.)"""
    router = cluster.start_router(policy="eldr", centroids=centroids, extra=[
        "--health-interval", "0.5", "--health-failures", "2", "--health-timeout", "4"])
    victim, survivor = cluster.decoders
    victim.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: [w["healthy"] for w in decode_rows(router.url)] == [False, True], 20,
                 "the stopped decoder taken out")
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda i: generate(router.url, prompt(i)), range(4)))
        assert [o.status_code for o in outs] == [200] * 4
        assert {o.json()["meta_info"]["eldr_route"]["decoder"] for o in outs} == {survivor.url}
    finally:
        victim.signal(signal.SIGCONT)
    wait_for(lambda: all(w["healthy"] for w in decode_rows(router.url)), 20, "the decoder back after SIGCONT")
    assert all_idle(router.url)


def test_requests_that_break_on_a_decoder_open_its_breaker(cluster, centroids):
    """Health checks off: only request failures can take the stopped decoder out. A request that
    times out on it opens the breaker; re-adding the decoder (membership probe) puts it back."""
    router = cluster.start_router(policy="rr", extra=[
        "--health-interval", "0", "--health-failures", "1", "--request-timeout", "3", "--orphan-grace", "30"])
    victim, survivor = cluster.decoders
    victim.signal(signal.SIGSTOP)
    try:
        outs = [generate(router.url, prompt(i)) for i in (1, 2, 3)]
    finally:
        victim.signal(signal.SIGCONT)
    codes = [o.status_code for o in outs]
    assert sorted(codes) == [200, 200, 502], [o.text for o in outs]
    failed = outs[codes.index(502)].json()["error"]["message"]
    assert victim.url in failed and "TimeoutError" in failed, failed
    assert [w["healthy"] for w in decode_rows(router.url)] == [False, True]
    assert all(o.json()["meta_info"]["eldr_route"]["decoder"] == survivor.url for o in outs if o.status_code == 200)
    assert requests.delete(router.url + "/workers", params={"url": victim.url}, timeout=10).status_code == 200
    r = requests.post(router.url + "/workers", json={"url": victim.url, "role": "decode"}, timeout=30)
    assert r.status_code == 201 and r.json()["healthy"] is True
    used = {generate(router.url, prompt(i)).json()["meta_info"]["eldr_route"]["decoder"] for i in (4, 5)}
    assert used == {victim.url, survivor.url}
    assert all_idle(router.url)


def test_prefill_killed_gives_clear_errors_and_leaves_no_reservations(cluster, centroids):
    """The prefill dies (a) with a request queued on it and (b) just after it published a request's
    counts, before the decoder pulled the KV. Both requests get a 502 that names the prefill, the
    decoders end up holding nothing, the router's counters return to zero."""
    prefill = cluster.prefills[0]
    router = cluster.start_router(policy="eldr", centroids=centroids, extra=["--orphan-grace", "3"])
    assert generate(router.url, prompt(0)).status_code == 200

    # The test listens to the prefill's counts like the router does, and freezes the prefill the
    # moment a report goes out: the decoder is about to bootstrap from a server that will not answer.
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
    sub.connect(f"tcp://127.0.0.1:{prefill.counts_port}")
    time.sleep(0.5)
    frozen = threading.Event()

    def freeze_on_counts():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sub.poll(1000) and decode_message(sub.recv_multipart())[0].kind == "counts":
                prefill.signal(signal.SIGSTOP)
                frozen.set()
                return

    watcher = threading.Thread(target=freeze_on_counts, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            after_counts = pool.submit(generate, router.url, prompt(1), max_new_tokens=32)
            assert frozen.wait(60), "the prefill never published counts"
            time.sleep(1.0)
            queued = pool.submit(generate, router.url, prompt(2))  # waits on the frozen prefill
            time.sleep(1.0)
            cluster.kill(prefill)
            started = time.monotonic()
            outs = [after_counts.result(60), queued.result(60)]
            assert time.monotonic() - started < 30
    finally:
        sub.close(0)
        watcher.join(5)
    for o in outs:
        assert o.status_code == 502, o.text
        assert "prefill server failed" in o.json()["error"]["message"], o.text
    assert all_idle(router.url)
    for d in cluster.decoders:
        wait_for(lambda d=d: server_busy(d.url) == 0, 60, f"decoder {d.url} to drop the orphaned request")

    cluster.restart(prefill)
    wait_for(lambda: all(w["healthy"] for w in workers(router.url)["workers"]), 30, "the prefill back")
    assert generate(router.url, prompt(3)).status_code == 200
    assert all_idle(router.url)


def test_client_disconnect_mid_stream_aborts_downstream_and_releases_load(cluster, centroids):
    router = cluster.start_router(policy="eldr", centroids=centroids)
    stream = open_stream(router.url, prompt(4))
    decoder = json.loads(stream.headers["X-ELDR-Route"])["decoder"]
    lines = stream.iter_lines()
    for _ in range(3):
        next(lines)
    assert server_busy(decoder) >= 1  # (a health-check generation may be running too)
    stream.close()  # the client goes away
    wait_for(lambda: all_idle(router.url), 15, "the router to release the load")
    wait_for(lambda: server_busy(decoder) == 0, 15, "the decoder to abort the request")
    assert generate(router.url, prompt(5)).status_code == 200


@pytest.mark.parametrize("mode,fallback", [
    ("negative", "bad-counts"), ("wrong-shape", "bad-counts"), ("short-bytes", "bad-counts"),
    ("garbage", "counts-lost"), ("unavailable", "counts-unavailable"),
])
def test_misbehaving_prefill_counts_fall_back_and_keep_serving(cluster, centroids, relay, mode, fallback):
    router = cluster.start_router(policy="eldr", centroids=centroids, extra=["--counts-deadline", "1"],
                                  prefill_counts_port=relay.port)
    time.sleep(0.5)  # the router's SUB joins the relay
    relay.mode = mode
    r = generate(router.url, prompt(6))
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["eldr_route"]["fallback"] == fallback
    relay.mode = "pass"
    r = generate(router.url, prompt(7))
    assert r.status_code == 200 and r.json()["meta_info"]["eldr_route"]["fallback"] is None
    metrics = requests.get(router.url + "/metrics", timeout=5).text
    assert f'eldr_fallbacks_total{{reason="{fallback}"}} 1.0' in metrics
    assert all_idle(router.url)


@pytest.fixture(scope="module")
def relay(cluster):
    r = CountsRelay(HOST, cluster.prefills[0].counts_port)
    yield r
    r.close()


def test_lost_counts_are_caught_within_100ms_and_queueing_never_times_out(cluster, centroids, relay):
    """A queue on the prefill deeper than the counts deadline, reports delayed 50 ms and every
    fifth one dropped on the way: queued requests still get their counts (the deadline runs from
    the prefill's start), each dropped report is routed least-loaded as counts-lost (typically
    within 100 ms of when it would have arrived), and nothing times out."""
    deadline_s = 5.0  # the default
    router = cluster.start_router(policy="eldr", centroids=centroids, prefill_counts_port=relay.port,
                                  extra=["--counts-deadline", str(deadline_s)])
    wait_for(lambda: generate(router.url, prompt(0)).json()["meta_info"]["eldr_route"]["fallback"] is None,
             10, "the router's SUB to join the relay")
    relay.set(delay_s=0.05, drop_every=5)
    relay.dropped()  # forget earlier tests' drops
    # Distinct prompts (no radix-cache hits to shorten the queue), about 300 tokens each: together
    # several times what the prefill's KV holds.
    texts = [prompt(i) * 2 for i in range(N_QUEUED)]

    def one(i: int) -> dict:
        r = requests.post(router.url + "/generate", json={
            "text": texts[i], "sampling_params": {"temperature": 0, "max_new_tokens": 2}}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["meta_info"]["eldr_route"]

    try:
        with ThreadPoolExecutor(N_QUEUED) as pool:
            routes = list(pool.map(one, range(N_QUEUED)))
        gap = relay.max_heartbeat_gap()
    finally:
        relay.set(delay_s=0.0, drop_every=0)
    by_room = {r["room"]: (i, r) for i, r in enumerate(routes)}
    fallbacks = collections.Counter(r["fallback"] for r in routes)
    assert fallbacks["counts-timeout"] == 0, fallbacks
    # room -> seconds from the report's due time to the heartbeat naming it; only this test's rooms
    # (SGLang's own health-check generations on the prefill publish too, under room 0).
    late = {room: t for room, t in relay.dropped().items() if room in by_room}
    assert late and {r["room"] for r in routes if r["fallback"] == "counts-lost"} == set(late)
    assert fallbacks[None] == N_QUEUED - len(late), fallbacks
    print(f"heartbeats at most {1e3 * gap:.0f} ms apart; {len(late)} reports lost, each "
          f"known lost {1e3 * min(late.values()):.0f}-{1e3 * max(late.values()):.0f} ms after it was due; longest "
          f"wait that still got counts {max(r['counts_wait_ms'] for r in routes if r['fallback'] is None):.0f} ms")
    # Typically within one heartbeat; the worst case is set by how long the forwarder process waits
    # for one of two saturated cores (heartbeat gaps of 222-238 ms at this load, RESULTS §7), which
    # the 100 ms does not allow for. The bound on the worst case only has to stay far below
    # the 5 s deadline a lost report would otherwise wait for; CI ran the suite about a third slower
    # than the rig.
    assert float(np.median(list(late.values()))) <= 0.1, late
    assert max(late.values()) <= 1.0, late
    # The queue was deeper than the deadline: requests that waited longer than it still got counts.
    assert max(r["counts_wait_ms"] for r in routes if r["fallback"] is None) > 1e3 * deadline_s
    assert all_idle(router.url)


N_QUEUED = 160
