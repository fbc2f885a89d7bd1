"""The stateful interface: in-flight counters, health, centroid swaps, baselines, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_eldr.router_rs import BASELINES, BaselineRouter, LocalityBandRouter

POLICIES = ["eldr", *BASELINES]


def make(policy: str, workers: int = 4):
    if policy == "eldr":
        return LocalityBandRouter(np.eye(workers, 8, dtype=np.float32) + 0.01, 0.1)
    return BaselineRouter(policy, workers, seed=3)


@pytest.mark.parametrize("policy", POLICIES)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60))
def test_counters_never_negative_and_return_to_zero(policy, ops):
    router = make(policy)
    outstanding: list[int] = []
    for acquire, k in ops:
        if acquire:
            sig = np.zeros(8, dtype=np.float32)
            sig[k] = 1.0
            outstanding.append(router.acquire(sig))
        elif outstanding:
            router.release(outstanding.pop(k % len(outstanding)))
        else:
            with pytest.raises(ValueError, match="already 0"):
                router.release(k % 4)
        loads = router.loads()
        assert (loads >= 0).all()
        assert loads.sum() == len(outstanding)
    for w in outstanding:
        router.release(w)
    assert router.loads().tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("policy", POLICIES)
def test_unhealthy_never_chosen(policy):
    router = make(policy)
    router.set_healthy(1, False)
    router.set_healthy(2, False)
    picks = {router.acquire(np.eye(1, 8, 1, dtype=np.float32)[0]) for _ in range(40)}
    assert picks <= {0, 3}
    assert router.healthy() == [True, False, False, True]
    for w in (0, 3):
        router.set_healthy(w, False)
    with pytest.raises(ValueError, match="unhealthy"):
        router.acquire()


def test_baselines_behave_as_named():
    rr = BaselineRouter("rr", 3)
    assert [rr.acquire() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    jsq = BaselineRouter("jsq", 3)
    jsq.acquire(); jsq.acquire()
    assert jsq.loads().tolist() == [1, 1, 0] and jsq.acquire() == 2
    a = [BaselineRouter("random", 5, seed=9).acquire() for _ in range(1)]
    runs = [[r.acquire() for _ in range(20)] for r in (BaselineRouter("random", 5, seed=9), BaselineRouter("random", 5, seed=9))]
    assert runs[0] == runs[1] and a[0] == runs[0][0]
    assert len(set(runs[0])) > 1
    p2c = BaselineRouter("p2c", 4, seed=1)
    for _ in range(30):
        p2c.acquire()
    loads = p2c.loads()
    assert loads.max() - loads.min() <= 2, loads


def test_swap_centroids_keeps_identities_and_loads():
    router = LocalityBandRouter(np.eye(3, dtype=np.float32), 0.0)
    sig = np.array([1, 0, 0], dtype=np.float32)
    assert router.acquire(sig) == 0
    router.swap_centroids(np.eye(3, dtype=np.float32)[[2, 0, 1]])
    assert router.loads().tolist() == [1, 0, 0]
    assert router.acquire(sig) == 1
    np.testing.assert_array_equal(router.centroids(), np.eye(3, dtype=np.float32)[[2, 0, 1]])
    with pytest.raises(ValueError, match=r"centroids: expected shape \[3, 3\]"):
        router.swap_centroids(np.eye(2, 3, dtype=np.float32))


def test_receipt_reports_state_before_the_request():
    router = LocalityBandRouter(np.eye(2, dtype=np.float32), 0.5)
    r1 = router.acquire_with_receipt(np.array([1, 0.2], dtype=np.float32))
    r2 = router.acquire_with_receipt(np.array([1, 0.2], dtype=np.float32))
    assert r1["loads"] == [0, 0] and r2["loads"] == [1, 0]
    assert r1["band"] == [0, 1] and r1["worker"] == 0 and r2["worker"] == 1
    assert r1["policy"] == "eldr" and len(r1["scores"]) == 2


def test_concurrent_use_from_threads_balances():
    router = LocalityBandRouter(np.eye(4, 16, dtype=np.float32) + 0.1, 0.1, layers=2)
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 9, size=(2, 8)) for _ in range(8)]
    errors: list[BaseException] = []
    picked: list[int] = []

    def work():
        try:
            for i in range(500):
                w = router.acquire(counts[i % 8])
                picked.append(w)
                router.release(w)
        except BaseException as e:  # surfaced below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(picked) == 2000
    assert router.loads().tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: LocalityBandRouter(np.ones((2, 4), np.float32), -0.1), "tau: must be finite"),
        (lambda: LocalityBandRouter(np.ones((2, 4), np.float32), float("nan")), "tau: must be finite"),
        (lambda: LocalityBandRouter(np.ones((0, 4), np.float32), 0.1), "at least one decode worker"),
        (lambda: LocalityBandRouter(np.array([[1, np.nan]], np.float32), 0.1), "centroids: contains a non-finite"),
        (lambda: LocalityBandRouter(np.zeros((2, 4), np.float32), 0.1), "centroids: row 0 is all zeros"),
        (lambda: LocalityBandRouter(np.ones((2, 4), np.float32), 0.1, idf=np.ones((3, 4), np.float32)), "centroids: expected shape"),
        (lambda: LocalityBandRouter(np.ones((2, 4), np.float32), 0.1, idf=np.full((1, 4), np.inf, np.float32)), "idf: contains a non-finite"),
        (lambda: LocalityBandRouter(np.ones((2, 4), np.float32), 0.1, layer_mask=np.zeros(2, bool)), "kept layer"),
        (lambda: BaselineRouter("fifo", 2), "unknown policy"),
        (lambda: BaselineRouter("rr", 0), "at least one decode worker"),
    ],
)
def test_construction_errors_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_call_errors_are_clear_and_do_not_count():
    router = LocalityBandRouter(np.ones((2, 6), np.float32), 0.1, idf=np.ones((2, 3), np.float32))
    loads = np.zeros(2, dtype=np.int64)
    cases = [
        (lambda: router.select_counts(np.ones((3, 3), np.int32), loads), r"counts: expected shape \[2, 3\]"),
        (lambda: router.select_counts(np.array([[1, -2, 0], [0, 0, 0]]), loads), "counts: contains a negative"),
        (lambda: router.select(np.array([np.nan] * 6, np.float32), loads), "signature: contains a non-finite"),
        (lambda: router.select(np.ones(5, np.float32), loads), r"signature: expected shape \[6\]"),
        (lambda: router.select(np.ones(6, np.float32), np.zeros(3, np.int64)), r"loads: expected shape \[2\]"),
        (lambda: router.select(np.ones(6, np.float32), loads, np.zeros(2, bool)), "unhealthy"),
        (lambda: router.acquire(np.ones((2, 3), np.float64)), "counts_or_signature: expected"),
        (lambda: router.acquire("abc"), "counts_or_signature: expected"),
        (lambda: router.release(5), "out of range"),
        (lambda: router.set_healthy(2, True), "out of range"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert router.loads().tolist() == [0, 0]
    assert router.acquire(np.ones((2, 3), np.int16)) in (0, 1)


@given(st.lists(st.integers(0, 7), min_size=1, max_size=80), st.integers(0, 3))
def test_imbalance_guard_bounds_the_spread(stream, bound):
    """Whatever the locality says, no decoder gets a request while it is more than `bound`
    requests above the least-loaded one (so the spread never exceeds bound + 1)."""
    router = LocalityBandRouter(np.eye(4, 8, dtype=np.float32), 0.0, max_imbalance=bound)
    assert router.max_imbalance == bound
    for k in stream:
        sig = np.zeros(8, dtype=np.float32)
        sig[k % 2] = 1.0  # every request prefers decoder 0 or 1
        before = router.loads()
        w = router.acquire(sig)
        assert before[w] <= before.min() + bound
        loads = router.loads()
        assert loads.max() - loads.min() <= bound + 1


def test_imbalance_guard_rejects_negative_bound():
    with pytest.raises(ValueError, match="max_imbalance: must be >= 0"):
        LocalityBandRouter(np.eye(2, dtype=np.float32), 0.1, max_imbalance=-1)


def test_relative_guard_lets_locality_act_at_high_load():
    """max(1, floor(0.25 x mean in-flight)): at a high mean load the absolute +1 would override
    locality for a decoder 4 above the least loaded; the relative allowance (5) does not."""
    centroids = np.eye(4, 8, dtype=np.float32)
    sig = np.eye(1, 8, 0, dtype=np.float32)[0]
    busy = np.array([24, 20, 22, 22], dtype=np.int64)
    relative = LocalityBandRouter(centroids, 0.0, max_imbalance=1, imbalance_fraction=0.25)
    absolute = LocalityBandRouter(centroids, 0.0, max_imbalance=1)
    assert relative.imbalance_fraction == 0.25 and absolute.imbalance_fraction == 0.0
    assert relative.select(sig, busy) == 0 and absolute.select(sig, busy) == 1
    assert relative.select(sig, np.array([3, 0, 1, 2], dtype=np.int64)) == 1  # mean 1.5: the floor of 1 holds
    with pytest.raises(ValueError, match="imbalance_fraction: a relative guard needs max_imbalance"):
        LocalityBandRouter(centroids, 0.0, imbalance_fraction=0.25)
