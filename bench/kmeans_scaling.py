"""Balanced spherical K-means fit time: the min-cost-flow assignment in the package against the
N x N replicated Hungarian it replaced (scipy's linear_sum_assignment on the cost matrix with each
centroid repeated ceil(N/K) times), on realistic signatures (4 layers x 64 experts).

Two data sets: the prefill counts of bench/results/traces_tiny_moe.npz resampled (each layer's
counts redrawn multinomially with the same total) to N requests and turned into IDF signatures,
and unit vectors drawn around a few directions plus noise. The old Hungarian runs only up to
--old-max-n samples for a full fit (it takes seconds beyond that); one old assignment step is timed
at --old-step-n. Writes a JSON list of records and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from sglang_eldr import fitting
from sglang_eldr.signature import build_signatures

TRACES = Path(__file__).parent / "results" / "traces_tiny_moe.npz"


def trace_signatures(n: int, seed: int = 0) -> np.ndarray:
    pre = np.load(TRACES)["prefill"]
    rng = np.random.default_rng(seed)
    rows = pre[rng.integers(0, len(pre), n)]
    out = np.zeros_like(rows)
    for i, r in enumerate(rows):
        for l, layer in enumerate(r):
            total = int(layer.sum())
            if total:
                out[i, l] = rng.multinomial(total, layer / total)
    return build_signatures(out, fitting.fit_idf(out))


def clustered_signatures(n: int, seed: int = 0, directions: int = 6, dim: int = 4 * 64, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(size=(directions, dim))) ** 3
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, directions, n)] + noise * np.abs(rng.normal(size=(n, dim))) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def hungarian_assignment(cost: np.ndarray, cap: int) -> np.ndarray:
    rows, cols = linear_sum_assignment(np.repeat(cost, cap, axis=1))
    labels = np.empty(len(cost), dtype=np.int64)
    labels[rows] = cols // cap
    return labels


def hungarian_kmeans(x: np.ndarray, k: int, seed: int = 0, max_iter: int = 50):
    """balanced_spherical_kmeans as it was before the min-cost flow."""
    return fitting.balanced_spherical_kmeans(x, k, seed=seed, max_iter=max_iter, assign=hungarian_assignment)


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1000, 2048, 4096])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per new fit")
    ap.add_argument("--old-max-n", type=int, default=1000, help="largest N for a full fit with the old Hungarian")
    ap.add_argument("--old-step-n", type=int, default=2048, help="N for one old assignment step (0: skip)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kmeans_scaling.json")
    args = ap.parse_args()

    k = args.k
    records = []
    print(f"{'data':>9} {'N':>5} {'K':>3} {'new fit s':>10} {'iters':>5} {'new step ms':>11} "
          f"{'old fit s':>10} {'old step ms':>11} {'same':>5}")
    for data, gen in [("traces", trace_signatures), ("clustered", clustered_signatures)]:
        for n in args.sizes:
            x = gen(n)
            cap = math.ceil(n / k)
            new_s, (cents, labels, iters) = best_of(lambda: fitting.balanced_spherical_kmeans(x, k, seed=0), args.repeats)
            pts = fitting._unit_rows(np.asarray(x, dtype=np.float64))
            cost = 1.0 - pts @ pts[np.random.default_rng(1).choice(n, k, replace=False)].T
            step_s, _ = best_of(lambda: fitting.balanced_assignment(cost, cap), args.repeats)
            rec = {
                "data": data, "n": n, "k": k, "cap": cap, "dim": int(x.shape[1]),
                "new_fit_s": round(new_s, 4), "iterations": iters, "new_step_ms": round(step_s * 1e3, 2),
                "max_cluster": int(np.bincount(labels, minlength=k).max()),
                "old_fit_s": None, "old_iterations": None, "old_step_ms": None, "same_result": None,
            }
            if n <= args.old_max_n:
                old_s, (ocents, olabels, oiters) = best_of(lambda: hungarian_kmeans(x, k, seed=0), 1)
                rec.update(old_fit_s=round(old_s, 4), old_iterations=oiters,
                           same_result=bool(np.array_equal(olabels, labels) and np.array_equal(ocents, cents)))
            if n <= args.old_max_n or n == args.old_step_n:
                t = time.perf_counter()
                old_labels = hungarian_assignment(cost, cap)
                rec["old_step_ms"] = round((time.perf_counter() - t) * 1e3, 1)
                idx = np.arange(n)
                new_labels = fitting.balanced_assignment(cost, cap)
                rec["step_cost_diff"] = float(cost[idx, new_labels].sum() - cost[idx, old_labels].sum())
            records.append(rec)

            def fmt(v, spec):
                return format(v, spec) if v is not None else format("-", spec[:3])

            print(f"{data:>9} {n:>5} {k:>3} {new_s:>10.3f} {iters:>5} {step_s * 1e3:>11.1f} "
                  f"{fmt(rec['old_fit_s'], '>10.3f')} {fmt(rec['old_step_ms'], '>11.1f')} "
                  f"{str(rec['same_result']) if rec['same_result'] is not None else '-':>5}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_1m_after": round(os.getloadavg()[0], 2), "repeats": args.repeats}
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
