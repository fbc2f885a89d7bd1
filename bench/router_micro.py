"""Router decision latency from raw counts to a chosen decoder, measured from Python.

Three implementations of the identical rule over a sweep of fleet sizes W and model
geometries (L, E): the Rust core timed inside Rust (no FFI per call), the PyO3 call as the
load balancer makes it, and the NumPy reference. Writes a JSON list of records
{"impl", "workers", "layers", "experts", "p50_us", "p99_us"} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from sglang_eldr import numpy_router
from sglang_eldr.router_rs import LocalityBandRouter
from sglang_eldr.signature import build_signature

WORKERS = [4, 16, 64, 256, 1024]
# (impl, (layers, experts, workers), p50 limit in µs) from issue 10.
TARGETS = [("rust", (48, 128, 16), 3.0), ("pyo3", (48, 128, 16), 3.5), ("rust", (48, 128, 64), 12.0),
           ("rust", (48, 128, 1024), 120.0), ("rust", (58, 256, 1024), 500.0)]
GEOMETRIES = [(4, 32), (36, 128), (48, 128), (58, 256)]


def prompt_counts(rng: np.random.Generator, layers: int, experts: int, tokens: int = 128) -> np.ndarray:
    """Counts of a prompt whose tokens each pick top-k distinct experts per layer."""
    k = min(8, experts)
    counts = np.zeros((layers, experts), dtype=np.int32)
    for l in range(layers):
        picks = np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]
        counts[l] = np.bincount(picks.ravel(), minlength=experts)
    return counts


def percentiles(ns: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(ns, 50)) / 1e3, float(np.percentile(ns, 99)) / 1e3


def time_calls(fn, iters: int) -> np.ndarray:
    out = np.empty(iters, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(iters):
        t = clock()
        fn()
        out[i] = clock() - t
    return out


def measure(workers: int, layers: int, experts: int, iters: int, np_iters: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    idf = (0.1 + rng.random((layers, experts))).astype(np.float32)
    centroids = rng.random((workers, layers * experts), dtype=np.float32)
    counts = prompt_counts(rng, layers, experts)
    loads = (np.arange(workers) % 5).astype(np.int64)
    router = LocalityBandRouter(centroids, 0.1, idf=idf)
    unit = numpy_router.unit_rows(centroids)
    tau = 0.1

    def numpy_decision() -> int:
        return numpy_router.select(build_signature(counts, idf), unit, loads, tau)

    assert router.select_counts(counts, loads) == numpy_decision(), "implementations disagree"
    rust = router._bench_select(counts, loads, iters)
    pyo3 = time_calls(lambda: router.select_counts(counts, loads), iters)
    ref = time_calls(numpy_decision, np_iters)
    base = {"workers": workers, "layers": layers, "experts": experts}
    return [
        {"impl": name, **base, "p50_us": round(p50, 3), "p99_us": round(p99, 3)}
        for name, ns in (("rust", rust), ("pyo3", pyo3), ("numpy", ref))
        for p50, p99 in [percentiles(np.asarray(ns))]
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (finishes in well under 30 s)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/router_micro.json"), help="JSON output path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    iters, np_iters = (300, 40) if args.quick else (5000, 400)
    records: list[dict] = []
    started = time.perf_counter()
    for layers, experts in GEOMETRIES:
        for workers in WORKERS:
            records.extend(measure(workers, layers, experts, iters, np_iters, args.seed))
    elapsed = time.perf_counter() - started

    print(f"{'L':>3} {'E':>4} {'W':>5} | {'rust p50':>9} {'p99':>9} | {'pyo3 p50':>9} {'p99':>9} | {'numpy p50':>10} {'p99':>10} | numpy/pyo3")
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["layers"], r["experts"], r["workers"]), {})[r["impl"]] = r
    for (l, e, w), row in by_key.items():
        ru, py, nu = row["rust"], row["pyo3"], row["numpy"]
        print(
            f"{l:>3} {e:>4} {w:>5} | {ru['p50_us']:>8.2f}µ {ru['p99_us']:>8.2f}µ | {py['p50_us']:>8.2f}µ {py['p99_us']:>8.2f}µ"
            f" | {nu['p50_us']:>9.1f}µ {nu['p99_us']:>9.1f}µ | {nu['p50_us'] / py['p50_us']:>7.1f}×"
        )
    print("\ntargets (issue 10):")
    for impl, (l, e, w), limit in TARGETS:
        got = by_key[(l, e, w)][impl]["p50_us"]
        print(f"  {impl:5} W={w:<5} ({l},{e}) p50 {got:8.2f} µs  target <= {limit:g} µs: {'met' if got <= limit else 'NOT met'}")
    ratio = by_key[(48, 128, 16)]["numpy"]["p50_us"] / by_key[(48, 128, 16)]["pyo3"]["p50_us"]
    print(f"  numpy/pyo3 at W=16 (48,128): {ratio:.1f}x  target >= 15x: {'met' if ratio >= 15 else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{len(records)} records in {elapsed:.1f} s on {platform.processor() or platform.machine()} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
