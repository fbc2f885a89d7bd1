"""Calibration math and the centroid file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from sglang_eldr import centroids, fitting
from sglang_eldr.centroids import CentroidFileError, Geometry
from sglang_eldr.router_rs import LocalityBandRouter
from sglang_eldr.signature import build_signature, build_signatures


def planted(n_per: int, domains: int, layers: int = 3, experts: int = 16, seed: int = 0, noisy_layer: int | None = 2):
    """Counts where each domain prefers its own experts in every layer except `noisy_layer`."""
    rng = np.random.default_rng(seed)
    pre, dec, labels = [], [], []
    for d in range(domains):
        pref = rng.dirichlet(np.full(experts, 0.3), size=layers)
        for _ in range(n_per):
            c = np.zeros((layers, experts), dtype=np.int32)
            o = np.zeros((layers, experts), dtype=np.int32)
            for l in range(layers):
                p = rng.dirichlet(np.full(experts, 0.3)) if l == noisy_layer else pref[l]
                c[l] = rng.multinomial(64, p)
                o[l] = rng.multinomial(32, pref[l] if l != noisy_layer else rng.dirichlet(np.ones(experts)))
            pre.append(c)
            dec.append(o)
            labels.append(d)
    return np.array(pre), np.array(dec), np.array(labels)


def test_idf_formula():
    counts = np.array([[[1, 0, 2]], [[1, 0, 0]], [[3, 0, 0]]])
    idf = fitting.fit_idf(counts)
    np.testing.assert_allclose(idf, np.log(4 / np.array([[4, 1, 2]])).astype(np.float32), rtol=1e-6)


@given(n=st.integers(4, 60), k=st.integers(1, 6), seed=st.integers(0, 1000))
def test_balanced_kmeans_sizes_bounded_and_deterministic(n, k, seed):
    if k > n:
        k = n
    x = np.random.default_rng(seed).random((n, 5))
    c1, l1, _ = fitting.balanced_spherical_kmeans(x, k, seed=seed)
    c2, l2, _ = fitting.balanced_spherical_kmeans(x, k, seed=seed)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(c1, c2)
    sizes = np.bincount(l1, minlength=k)
    assert sizes.max() <= math.ceil(n / k)
    assert sizes.sum() == n
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, rtol=1e-5)


def test_balanced_kmeans_recovers_planted_domains_even_when_unbalanced():
    pre, _, labels = planted(30, 4, noisy_layer=None)
    sigs = build_signatures(pre, fitting.fit_idf(pre))
    _, found, _ = fitting.balanced_spherical_kmeans(sigs, 4, seed=0)
    # Each true domain lands (almost) entirely in one cluster.
    purity = sum(np.bincount(found[labels == d]).max() for d in range(4)) / len(labels)
    assert purity >= 0.95, purity
    # Twice as many points of one domain: balance forces a split, no cluster exceeds ceil(N/K).
    pre2 = np.concatenate([pre, pre[labels == 0]])
    _, l2, _ = fitting.balanced_spherical_kmeans(build_signatures(pre2), 4, seed=0)
    assert np.bincount(l2).max() <= math.ceil(len(pre2) / 4)


def hungarian_assignment(cost: np.ndarray, cap: int) -> np.ndarray:
    """Test-only reference: the N x (K * cap) replicated Hungarian the package used before."""
    rows, cols = linear_sum_assignment(np.repeat(cost, cap, axis=1))
    labels = np.empty(len(cost), dtype=np.int64)
    labels[rows] = cols // cap
    return labels


def hungarian_kmeans(x, k: int, seed: int = 0, max_iter: int = 50):
    """Test-only reference: balanced_spherical_kmeans as it was, on the replicated Hungarian."""
    return fitting.balanced_spherical_kmeans(x, k, seed=seed, max_iter=max_iter, assign=hungarian_assignment)


def _check_feasible(labels: np.ndarray, n: int, k: int, cap: int) -> None:
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < k  # every sample in exactly one cluster
    assert np.bincount(labels, minlength=k).max() <= cap


@settings(max_examples=200)
@given(n=st.integers(1, 40), k=st.integers(1, 7), slack=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_balanced_assignment_equals_hungarian_on_continuous_costs(n, k, slack, seed):
    # Random continuous costs: the optimum is unique (almost surely), so the labels must match.
    cap = math.ceil(n / k) + slack
    cost = np.random.default_rng(seed).random((n, k)) * 2.0
    got, want = fitting.balanced_assignment(cost, cap), hungarian_assignment(cost, cap)
    _check_feasible(got, n, k, cap)
    np.testing.assert_array_equal(got, want)
    idx = np.arange(n)
    assert cost[idx, got].sum() == pytest.approx(cost[idx, want].sum(), abs=1e-9)


@settings(max_examples=200)
@given(n=st.integers(1, 40), k=st.integers(1, 7), levels=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_balanced_assignment_optimal_cost_with_ties(n, k, levels, seed):
    # Few distinct cost values: many optima; any one of them, at the Hungarian's total cost.
    cap = math.ceil(n / k)
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, levels, size=(n, k)) / levels - 0.5
    got, want = fitting.balanced_assignment(cost, cap), hungarian_assignment(cost, cap)
    _check_feasible(got, n, k, cap)
    idx = np.arange(n)
    assert cost[idx, got].sum() == pytest.approx(cost[idx, want].sum(), abs=1e-9)


def test_balanced_assignment_respects_capacity_against_preference():
    # Every sample prefers cluster 0; capacity pushes the ones that lose least elsewhere.
    cost = np.array([[0.0, 1.0, 1.0], [0.0, 0.1, 1.0], [0.0, 1.0, 0.2], [0.0, 0.5, 0.9], [0.0, 1.0, 1.0]])
    labels = fitting.balanced_assignment(cost, 2)
    np.testing.assert_array_equal(labels, hungarian_assignment(cost, 2))
    assert labels.tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="cannot hold"):
        fitting.balanced_assignment(cost, 1)
    with pytest.raises(ValueError, match="non-finite"):
        fitting.balanced_assignment(np.array([[0.0, np.nan]]), 1)
    with pytest.raises(ValueError, match="non-empty"):
        fitting.balanced_assignment(np.zeros((0, 2)), 1)


def assert_same_as_hungarian(x, k: int, seed: int) -> None:
    """Labels, centroids and iteration count identical to the replicated-Hungarian version."""
    got = fitting.balanced_spherical_kmeans(x, k, seed=seed)
    want = hungarian_kmeans(x, k, seed=seed)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert got[2] == want[2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(4, 60), k=st.integers(1, 6), seed=st.integers(0, 1000))
def test_balanced_kmeans_matches_the_hungarian_version(n, k, seed):
    k = min(k, n)
    x = np.random.default_rng(seed).random((n, 5))
    assert_same_as_hungarian(x, k, seed)


def test_balanced_kmeans_matches_the_hungarian_version_on_planted_signatures():
    pre, _, _ = planted(30, 4, noisy_layer=2)
    sigs = build_signatures(pre, fitting.fit_idf(pre))
    for k, seed in [(3, 0), (4, 1), (7, 2)]:
        assert_same_as_hungarian(sigs, k, seed)


def test_kmeans_rejects_impossible_k():
    with pytest.raises(ValueError, match="cannot fill"):
        fitting.balanced_spherical_kmeans(np.ones((2, 3)), 3)


def test_layer_mask_drops_the_uninformative_layer():
    pre, dec, _ = planted(25, 4, noisy_layer=2)
    idf = fitting.fit_idf(pre)
    mask, curve, rho_all = fitting.select_layers(pre, dec, idf, seed=0)
    assert not mask[2] and mask[:2].all(), (mask, curve)
    assert max(curve) > rho_all > 0


def test_align_centroids_restores_identity():
    rng = np.random.default_rng(1)
    old = rng.random((5, 7)).astype(np.float32)
    perm = rng.permutation(5)
    np.testing.assert_array_equal(fitting.align_centroids(old, old[perm] * 1.01), (old * 1.01).astype(np.float32))


def test_fit_round_trip_and_routes_domains_apart(tmp_path):
    pre, dec, labels = planted(20, 3, noisy_layer=2)
    cs = fitting.fit(pre, num_workers=3, top_k=4, decode_counts=dec, seed=0, model="planted")
    assert max(cs.fit.cluster_sizes) <= 20 and sum(cs.fit.cluster_sizes) == 60
    path = tmp_path / "c.eldr"
    centroids.save(cs, path)
    back = centroids.load(path, expect=Geometry(layers=3, experts=16, top_k=4))
    np.testing.assert_array_equal(back.centroids, cs.centroids)
    np.testing.assert_array_equal(back.idf, cs.idf)
    np.testing.assert_array_equal(back.layer_mask, cs.layer_mask)
    assert back.fit == cs.fit
    router = LocalityBandRouter(back.centroids, 0.0, idf=back.idf, layer_mask=back.layer_mask)
    loads = np.zeros(3, dtype=np.int64)
    picks = np.array([router.select_counts(c, loads) for c in pre])
    for d in range(3):
        assert np.bincount(picks[labels == d]).max() >= 18  # each domain owns a decoder
    # Rust's signature from raw counts equals the Python one.
    np.testing.assert_allclose(
        router.scores(pre[0]),
        back.centroids @ build_signature(pre[0], back.idf, back.layer_mask) / np.linalg.norm(back.centroids, axis=1),
        atol=1e-5,
    )


def test_centroid_file_rejections(tmp_path):
    pre, _, _ = planted(6, 2, noisy_layer=None)
    cs = fitting.fit(pre, num_workers=2, top_k=4)
    data = centroids.dumps(cs)
    with pytest.raises(CentroidFileError, match="not a readable centroid file"):
        centroids.loads(data[: len(data) // 2])
    garbled = bytearray(data)
    garbled[len(garbled) - 40] ^= 0xFF
    with pytest.raises(CentroidFileError, match="checksum mismatch|corrupt"):
        centroids.loads(bytes(garbled))
    with pytest.raises(CentroidFileError, match="not a readable"):
        centroids.loads(b"")
    with pytest.raises(CentroidFileError, match="but the model has layers=4"):
        centroids.loads(data, expect=Geometry(layers=4, experts=16, top_k=4))
    with pytest.raises(CentroidFileError, match="cannot read"):
        centroids.load(tmp_path / "missing.eldr")
    bad = centroids.CentroidSet(cs.geometry, cs.idf, cs.layer_mask, cs.centroids[:, :5], cs.fit)
    with pytest.raises(CentroidFileError, match="centroids: expected"):
        centroids.dumps(bad)


def test_signature_math():
    counts = np.array([[2, 0], [0, 0], [1, 1]], dtype=np.uint8)
    idf = np.array([[1, 5], [3, 3], [2, 0]], dtype=np.float32)
    sig = build_signature(counts, idf, [True, False, True])
    np.testing.assert_allclose(sig, np.array([2, 0, 2, 0]) / np.sqrt(8), rtol=1e-6)
    assert sig.dtype == np.float32
    zero = build_signature(np.zeros((3, 2), dtype=np.int64))
    assert zero.tolist() == [0.0] * 6
    for bad, msg in [(np.ones((2, 2), float), "integer"), (np.array([[-1]]), "negative"), (np.ones(3, int), "2-D")]:
        with pytest.raises(ValueError, match=msg):
            build_signature(bad)
