"""The fitting maths of calibration and refits (no server needed): IDF weights, greedy layer mask by
Spearman rho, balanced spherical K-means with one centroid per decoder (exact min-cost-flow
assignment), and centroid alignment for refits. The CLI is `sglang_eldr.calibrate`.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import numpy.typing as npt
from ortools.graph.python import min_cost_flow
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr
from sklearn.cluster import kmeans_plusplus

from sglang_eldr.centroids import CentroidSet, FitInfo, Geometry
from sglang_eldr.signature import build_signatures

FloatArray = npt.NDArray[np.float32]


def _check_batch(counts: npt.ArrayLike, name: str) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 3 or len(c) == 0:
        raise ValueError(f"{name}: expected a non-empty [N, layers, experts] array, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{name}: expected integer counts, got {c.dtype}")
    if c.min() < 0:
        raise ValueError(f"{name}: contains negative counts")
    return c


def fit_idf(counts: npt.ArrayLike) -> FloatArray:
    """w[l,e] = ln((N+1)/(df[l,e]+1)), df = number of requests that used expert e in layer l."""
    c = _check_batch(counts, "counts")
    df = (c > 0).sum(axis=0)
    return np.log((len(c) + 1) / (df + 1)).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _sample_pairs(n: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All pairs when there are few, else `count` random pairs of distinct requests."""
    if n * (n - 1) // 2 <= count:
        i, j = np.triu_indices(n, k=1)
        return i, j
    i = rng.integers(0, n, size=count)
    j = rng.integers(0, n - 1, size=count)
    return i, j + (j >= i)


def select_layers(
    prefill_counts: npt.ArrayLike,
    decode_counts: npt.ArrayLike,
    idf: npt.ArrayLike,
    pairs: int = 30_000,
    seed: int = 0,
) -> tuple[np.ndarray, list[float], float]:
    """Greedy forward layer selection maximising Spearman rho between pairwise cosine distances
    of prefill signatures and of L2-normalised decode profiles. Returns (mask, rho after each
    greedy step, rho with all layers); the mask is the greedy prefix at the peak rho."""
    pre = _check_batch(prefill_counts, "prefill_counts").astype(np.float64)
    dec = _check_batch(decode_counts, "decode_counts").astype(np.float64)
    if pre.shape != dec.shape:
        raise ValueError(f"decode_counts: shape {dec.shape} differs from prefill_counts {pre.shape}")
    n, layers, _ = pre.shape
    if n < 3:
        raise ValueError("select_layers needs at least 3 requests")
    x = pre * np.asarray(idf, dtype=np.float64)[None]
    i, j = _sample_pairs(n, pairs, np.random.default_rng(seed))
    prof = _unit_rows(dec.reshape(n, -1))
    target = 1.0 - np.einsum("pd,pd->p", prof[i], prof[j])
    dots = np.einsum("ple,ple->pl", x[i], x[j])  # [P, L]
    sq = np.einsum("nle,nle->nl", x, x)  # [N, L]

    def rho(layer_set: np.ndarray) -> float:
        d = dots[:, layer_set].sum(1)
        ni, nj = sq[i][:, layer_set].sum(1), sq[j][:, layer_set].sum(1)
        denom = np.sqrt(ni * nj)
        cos = np.divide(d, denom, out=np.zeros_like(d), where=denom > 0)
        r = spearmanr(1.0 - cos, target).statistic
        return -1.0 if not np.isfinite(r) else float(r)

    chosen: list[int] = []
    curve: list[float] = []
    remaining = list(range(layers))
    while remaining:
        best_rho, best_l = max((rho(np.array(chosen + [l])), -l) for l in remaining)
        chosen.append(-best_l)
        remaining.remove(-best_l)
        curve.append(best_rho)
    peak = int(np.argmax(curve))
    mask = np.zeros(layers, dtype=bool)
    mask[chosen[: peak + 1]] = True
    return mask, curve, rho(np.arange(layers))


def balanced_assignment(cost: npt.ArrayLike, cap: int) -> np.ndarray:
    """The optimal capacity-constrained assignment: labels [N] minimising sum cost[i, labels[i]]
    with every sample in exactly one of the K clusters and at most `cap` samples per cluster.

    Solved exactly as the N x K transportation problem, a min-cost flow (source -> sample, capacity
    1 -> cluster at cost[i, k] -> sink, capacity `cap`) with OR-Tools' cost-scaling solver, which is
    exact in integers: each row is shifted by its minimum (the optimum does not move) and scaled to
    at least 40 fractional bits, far finer than the float32 signatures the costs come from."""
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"cost: expected a non-empty [N, K] matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cost: contains non-finite values")
    n, k = c.shape
    if cap * k < n:
        raise ValueError(f"cap: {k} clusters of at most {cap} cannot hold {n} samples")
    c = c - c.min(axis=1, keepdims=True)
    span = float(c.max())
    # OR-Tools needs max |cost| x (nodes + 1) and the total cost inside int64.
    bits = min(40, 61 - math.ceil(math.log2(n + k + 2)))
    scale = 2.0**bits / span if span > 0 else 0.0
    sink = n + k
    flow = min_cost_flow.SimpleMinCostFlow()
    flow.add_arcs_with_capacity_and_unit_cost(
        np.repeat(np.arange(n, dtype=np.int32), k),
        np.tile(np.arange(n, n + k, dtype=np.int32), n),
        np.ones(n * k, dtype=np.int64),
        np.rint(c.ravel() * scale).astype(np.int64),
    )
    flow.add_arcs_with_capacity_and_unit_cost(
        np.arange(n, n + k, dtype=np.int32),
        np.full(k, sink, dtype=np.int32),
        np.full(k, cap, dtype=np.int64),
        np.zeros(k, dtype=np.int64),
    )
    supplies = np.zeros(n + k + 1, dtype=np.int64)
    supplies[:n] = 1
    supplies[sink] = -n
    flow.set_nodes_supplies(np.arange(n + k + 1, dtype=np.int32), supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"balanced assignment: min-cost flow ended with status {status}")
    x = np.asarray(flow.flows(np.arange(n * k, dtype=np.int32))).reshape(n, k)
    if not (np.all((x == 0) | (x == 1)) and np.all(x.sum(axis=1) == 1) and np.all(x.sum(axis=0) <= cap)):
        raise RuntimeError("balanced assignment: min-cost flow returned an infeasible assignment")
    return np.asarray(x.argmax(axis=1), dtype=np.int64)


def balanced_spherical_kmeans(
    x: npt.ArrayLike, k: int, seed: int = 0, max_iter: int = 50,
    assign: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> tuple[FloatArray, np.ndarray, int]:
    """Spherical K-means where every cluster holds at most ceil(N/k) points.

    Assignment is the optimal capacity-constrained one (`balanced_assignment` on cost 1 - x·c, or
    `assign(cost, cap)`, which tests and benchmarks use to compare solvers); seeding is k-means++.
    Returns (unit centroids [k, d], labels [N], iterations)."""
    assign = assign or balanced_assignment
    pts = _unit_rows(np.asarray(x, dtype=np.float64))
    n = len(pts)
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if n < k:
        raise ValueError(f"x: {n} points cannot fill {k} clusters")
    cap = math.ceil(n / k)
    centers, _ = kmeans_plusplus(pts, n_clusters=k, random_state=seed)
    centers = _unit_rows(centers)
    labels = np.full(n, -1)
    it = 0
    for it in range(1, max_iter + 1):
        new_labels = assign(1.0 - pts @ centers.T, cap)
        for c in range(k):
            members = pts[new_labels == c]
            if len(members):
                mean = members.sum(0)
                norm = np.linalg.norm(mean)
                if norm > 0:
                    centers[c] = mean / norm
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return centers.astype(np.float32), labels, it


def align_centroids(old: npt.ArrayLike, new: npt.ArrayLike) -> FloatArray:
    """Reorders `new` so row k is the new centroid closest to old row k (Hungarian on -old·newᵀ),
    keeping decoder identities stable across refits."""
    o, n = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if o.shape != n.shape:
        raise ValueError(f"new: shape {n.shape} differs from old {o.shape}")
    _, cols = linear_sum_assignment(-(o @ n.T))
    return np.asarray(n[cols], dtype=np.float32)


def fit(
    prefill_counts: npt.ArrayLike,
    num_workers: int,
    top_k: int,
    decode_counts: npt.ArrayLike | None = None,
    seed: int = 0,
    model: str = "",
    source: str = "",
) -> CentroidSet:
    """The whole offline fit: IDF, layer mask (when decode profiles are given), balanced K-means."""
    pre = _check_batch(prefill_counts, "prefill_counts")
    _, layers, experts = pre.shape
    idf = fit_idf(pre)
    rho = rho_all = None
    if decode_counts is not None:
        mask, curve, rho_all = select_layers(pre, decode_counts, idf, seed=seed)
        rho = max(curve)
    else:
        mask = np.ones(layers, dtype=bool)
    sigs = build_signatures(pre, idf, mask)
    if not np.any(sigs):
        raise ValueError("prefill_counts: every signature is zero (IDF removed all information); use more varied prompts")
    centroids, labels, iterations = balanced_spherical_kmeans(sigs, num_workers, seed=seed)
    return CentroidSet(
        geometry=Geometry(layers=layers, experts=experts, top_k=top_k, model=model),
        idf=idf,
        layer_mask=mask,
        centroids=centroids,
        fit=FitInfo(
            num_requests=len(pre),
            seed=seed,
            iterations=iterations,
            cluster_sizes=np.bincount(labels, minlength=num_workers).tolist(),
            spearman_rho=rho,
            spearman_rho_all_layers=rho_all,
            created_unix=time.time(),
            source=source,
        ),
    )
