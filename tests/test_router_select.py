"""Rust `select` agrees with the NumPy reference of the same rule on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_eldr import numpy_router
from sglang_eldr.router_rs import LocalityBandRouter
from sglang_eldr.signature import build_signature

EPS = 1e-4


@st.composite
def problems(draw, tau=None):
    w = draw(st.integers(1, 12))
    d = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    centroids = rng.random((w, d), dtype=np.float32) + np.float32(1e-3)
    # Duplicate some rows so exact score ties happen.
    for k in range(w):
        if draw(st.booleans()) and k > 0:
            centroids[k] = centroids[draw(st.integers(0, k - 1))]
    sig = (rng.random(d, dtype=np.float32) * (rng.random(d) < 0.7)).astype(np.float32)
    loads = rng.integers(0, draw(st.integers(1, 4)), size=w).astype(np.int64)
    healthy = rng.random(w) < 0.8
    if not healthy.any():
        healthy[rng.integers(w)] = True
    if tau is None:
        tau = draw(st.sampled_from([0.0, 0.0, 0.02, 0.1, 0.3, 1.0]) | st.floats(0.0, 2.0))
    return centroids, sig, loads, healthy, tau


def ambiguous(centroids, sig, tau, healthy) -> bool:
    """True when float rounding alone could change the decision (a score at the band edge, or
    two near-equal scores deciding a load tie or the nearest alternative)."""
    c = centroids.astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = sig.astype(np.float64)
    if not x.any():
        return False
    s = c @ x / np.linalg.norm(x)
    h = np.flatnonzero(healthy)
    thr = s[h].max() - tau
    if np.any(np.abs(s[h] - thr) < EPS):
        return True
    return bool(np.any(np.diff(np.sort(s[h])) < EPS))


@given(problems())
def test_select_matches_numpy_reference(p):
    centroids, sig, loads, healthy, tau = p
    router = LocalityBandRouter(centroids, tau)
    got = router.select(sig, loads, healthy)
    want = numpy_router.select(sig, numpy_router.unit_rows(centroids), loads, tau, healthy)
    assert healthy[got]
    if got != want:
        assert ambiguous(centroids, sig, tau, healthy), (got, want)
    # The pure function leaves the router's own counters alone.
    assert router.loads().tolist() == [0] * len(centroids)


@given(problems(tau=0.0))
def test_tau_zero_is_argmax_with_lowest_index_ties(p):
    centroids, sig, loads, healthy, _ = p
    router = LocalityBandRouter(centroids, 0.0)
    got = router.select(sig, loads, healthy)
    s = router.scores(sig)
    if not sig.any():
        cand = np.flatnonzero(healthy)
        assert got == cand[np.argmin(loads[cand])]
        return
    best = s[healthy].max()
    tied = np.flatnonzero(healthy & (s == best))
    assert got in tied
    assert loads[got] == loads[tied].min()
    assert got == min(k for k in tied if loads[k] == loads[tied].min())


@given(problems())
def test_never_more_loaded_than_the_least_loaded_band_member(p):
    centroids, sig, loads, healthy, tau = p
    router = LocalityBandRouter(centroids, tau)
    r = router.acquire_with_receipt(sig) if healthy.all() and not loads.any() else None
    got = router.select(sig, loads, healthy)
    if sig.any():
        members = numpy_router.band(router.scores(sig), tau, healthy)
        assert got in members and loads[got] == loads[members].min()
        tied = [k for k in members if loads[k] == loads[got]]
        s = router.scores(sig)
        assert s[got] == max(s[k] for k in tied)
    if r is not None:
        assert r["worker"] == got


@given(problems(tau=1.0))
def test_tau_one_is_pure_least_loaded_for_nonnegative_inputs(p):
    centroids, sig, loads, healthy, _ = p
    router = LocalityBandRouter(centroids, 1.0)
    got = router.select(sig, loads, healthy)
    cand = np.flatnonzero(healthy)
    assert loads[got] == loads[cand].min()
    if sig.any():
        s = router.scores(sig)
        least = cand[loads[cand] == loads[cand].min()]
        assert s[got] == s[least].max() and got == least[s[least] == s[least].max()][0]
    else:
        assert got == cand[np.argmin(loads[cand])]


@given(problems(), st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]))
def test_select_counts_builds_the_same_signature(p, dtype):
    centroids, _, loads, healthy, tau = p
    w, d = centroids.shape
    rng = np.random.default_rng(d * 7 + w)
    layers = 3
    experts = d
    counts = rng.integers(0, 5, size=(layers, experts)).astype(dtype)
    idf = (rng.random((layers, experts)) * 2).astype(np.float32)
    mask = np.array([True, False, True])
    wide = np.concatenate([centroids, centroids[:, ::-1]], axis=1)  # D = 2 kept layers × experts
    router = LocalityBandRouter(np.ascontiguousarray(wide), tau, idf=idf, layer_mask=mask)
    sig = build_signature(counts, idf, mask)
    got = router.select_counts(counts, loads, healthy)
    want = numpy_router.select(sig, numpy_router.unit_rows(wide), loads, tau, healthy)
    if got != want:
        assert ambiguous(wide, sig, tau, healthy), (got, want)
    np.testing.assert_allclose(router.scores(counts), numpy_router.scores(sig, numpy_router.unit_rows(wide)), atol=2e-6)


def test_zero_signature_falls_back_to_least_loaded_not_nan():
    router = LocalityBandRouter(np.eye(3, dtype=np.float32), 0.1)
    loads = np.array([2, 0, 1], dtype=np.int64)
    assert router.select(np.zeros(3, dtype=np.float32), loads) == 1
    assert router.select_counts(np.zeros((1, 3), dtype=np.int32), loads) == 1
    scores = router.scores(np.zeros(3, dtype=np.float32))
    assert scores.tolist() == [0.0, 0.0, 0.0]
    receipt = router.acquire_with_receipt(np.zeros((1, 3), dtype=np.int64))
    assert receipt["worker"] == 0 and receipt["scores"] is None and receipt["band"] == []


def test_non_contiguous_and_float64_inputs_are_accepted():
    c = np.asfortranarray(np.random.default_rng(0).random((4, 6), dtype=np.float32))
    router = LocalityBandRouter(c, 0.1)
    sig64 = np.random.default_rng(1).random(12)[::2]
    loads = np.zeros(4, dtype=np.int64)
    assert router.select(sig64, loads) == router.select(sig64.astype(np.float32), loads)


@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_nearest_alternative_rule(tau):
    router = LocalityBandRouter(np.eye(3, dtype=np.float32), tau)
    sig = np.array([1.0, 0.5, 0.1], dtype=np.float32)
    loads = np.array([5, 0, 0], dtype=np.int64)
    # Band of one (worker 0); with tau > 0 the second best (worker 1) joins and wins on load.
    assert router.select(sig, loads) == (0 if tau == 0 else 1)


def test_positive_tau_below_float32_range_still_adds_the_nearest_alternative():
    # Found by hypothesis in CI: tau=1.5e-207 rounds to 0.0f32; the band must still widen.
    centroids = np.eye(3, dtype=np.float32) + np.float32(0.01)
    router = LocalityBandRouter(centroids, 1.5e-207)
    sig = np.array([0.1, 1.0, 0.5], dtype=np.float32)
    want = numpy_router.select(sig, numpy_router.unit_rows(centroids), np.array([0, 10, 0]), 1.5e-207)
    assert router.select(sig, np.array([0, 10, 0])) == want == 2


@given(problems(), st.sampled_from(["int16", "int8"]), st.integers(0, 2**32 - 1))
def test_certified_kernels_decide_exactly_as_the_exact_rule(p, precision, seed):
    """The fixed-point estimates with their error bounds never change a decision, whatever the
    counts (some far above the int16 kernel's unscaled limit)."""
    centroids, _, loads, healthy, tau = p
    rng = np.random.default_rng(seed)
    layers, experts = 3, centroids.shape[1]
    wide = np.ascontiguousarray(np.concatenate([centroids, centroids[:, ::-1]], axis=1))
    idf = (rng.random((layers, experts)) * 2).astype(np.float32)
    mask = np.array([True, False, True])
    top = int(rng.choice([5, 300, 100_000]))
    counts = rng.integers(0, top, size=(layers, experts)).astype(np.int32)
    fast = LocalityBandRouter(wide, tau, idf=idf, layer_mask=mask, precision=precision)
    exact = LocalityBandRouter(wide, tau, idf=idf, layer_mask=mask, precision="exact")
    assert fast.kernel.startswith(precision) and exact.kernel == "exact"
    assert fast.select_counts(counts, loads, healthy) == exact.select_counts(counts, loads, healthy)
    np.testing.assert_array_equal(fast.scores(counts), exact.scores(counts))
    # The receipt's scores: exact where the decision needed them, the rest within score_error.
    receipt = fast.acquire_with_receipt(counts)
    assert receipt["scores"] is not None and receipt["score_error"] is not None
    assert np.all(np.abs(np.array(receipt["scores"]) - exact.scores(counts)) <= receipt["score_error"])
    assert fast.release(receipt["id"])
