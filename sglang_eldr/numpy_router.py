"""NumPy reference of the locality-band rule, for tests and for benchmarking the Rust router.

Same rule as `router_rs`: cosine (in float64) of the signature to the float32 unit centroids;
band = healthy workers with score >=
max - tau; when tau > 0 leaves one member, add the best-scoring other healthy worker; least
in-flight inside the band, load ties to the higher score, then the lowest index; zero signature
-> least in-flight overall (ties to the lowest index).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def unit_rows(centroids: npt.ArrayLike) -> npt.NDArray[np.float32]:
    c = np.asarray(centroids, dtype=np.float64)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("centroids: a row is all zeros")
    return (c / norms).astype(np.float32)


def scores(signature: npt.ArrayLike, unit_centroids: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = np.asarray(signature, dtype=np.float32).astype(np.float64)
    norm = float(np.linalg.norm(x))
    if norm == 0.0:
        return np.zeros(len(unit_centroids), dtype=np.float64)
    return (unit_centroids.astype(np.float64) @ x) / norm


def band(s: npt.NDArray[np.float64], tau: float, healthy: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    best = s[healthy].max()
    members = np.flatnonzero(healthy & (s >= best - tau))
    if tau > 0 and len(members) == 1:
        others = np.flatnonzero(healthy)
        others = others[others != members[0]]
        if len(others):
            members = np.sort(np.append(members, others[np.argmax(s[others])]))
    return members


def select(
    signature: npt.ArrayLike,
    unit_centroids: npt.NDArray[np.float32],
    loads: npt.ArrayLike,
    tau: float,
    healthy: npt.ArrayLike | None = None,
) -> int:
    l = np.asarray(loads, dtype=np.int64)
    h = np.ones(len(l), dtype=bool) if healthy is None else np.asarray(healthy, dtype=bool)
    if not h.any():
        raise ValueError("all decode workers are unhealthy")
    x = np.asarray(signature, dtype=np.float32)
    if not np.any(x):
        candidates = np.flatnonzero(h)
        return int(candidates[np.argmin(l[candidates])])
    s = scores(x, unit_centroids)
    candidates = band(s, tau, h)
    # lexsort: last key is primary -> load, then higher score, then index.
    order = np.lexsort((candidates, -s[candidates], l[candidates]))
    return int(candidates[order[0]])
