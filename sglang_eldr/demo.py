"""`make demo` until the PD cluster lands: calibrate on synthetic domain-structured expert
counts, then route a mixed stream with ELDR and with JSQ and print what each decided."""

from __future__ import annotations

import numpy as np

from sglang_eldr import calibrate
from sglang_eldr.router_rs import BaselineRouter, LocalityBandRouter

DOMAINS = ["code", "math", "legal", "medical"]


def synthetic_counts(rng: np.random.Generator, prefs: np.ndarray, domain: int, tokens: int = 96) -> np.ndarray:
    layers, experts = prefs.shape[1:]
    return np.stack([rng.multinomial(tokens * 2, prefs[domain, l]) for l in range(layers)]).astype(np.int32)


def main() -> None:
    rng = np.random.default_rng(0)
    layers, experts, top_k = 4, 32, 2
    prefs = rng.dirichlet(np.full(experts, 0.2), size=(len(DOMAINS), layers))
    calib_domains = rng.integers(0, len(DOMAINS), 200)
    calib = np.stack([synthetic_counts(rng, prefs, d) for d in calib_domains])
    cs = calibrate.fit(calib, num_workers=len(DOMAINS), top_k=top_k, seed=0, source="synthetic demo")
    print(f"calibrated {cs.fit.num_requests} requests -> {len(cs.centroids)} centroids, sizes {cs.fit.cluster_sizes}")

    eldr = LocalityBandRouter(cs.centroids, 0.1, idf=cs.idf, layer_mask=cs.layer_mask)
    jsq = BaselineRouter("jsq", len(DOMAINS))
    stream = rng.integers(0, len(DOMAINS), 24)
    per_decoder = {name: np.zeros((len(DOMAINS), len(DOMAINS)), dtype=int) for name in ("eldr", "jsq")}
    active: list[tuple[int, int]] = []
    for i, d in enumerate(stream):
        counts = synthetic_counts(rng, prefs, d)
        r = eldr.acquire_with_receipt(counts)
        j = jsq.acquire(counts)
        active.append((r["worker"], j))
        per_decoder["eldr"][r["worker"], d] += 1
        per_decoder["jsq"][j, d] += 1
        scores = " ".join(f"{s:.2f}" for s in r["scores"])
        print(f"req {i:2d} {DOMAINS[d]:>8} -> eldr decoder {r['worker']} band={r['band']} scores=[{scores}] loads={r['loads']} | jsq {j}")
        if len(active) > 6:  # requests finish: keep a few in flight
            w_e, w_j = active.pop(0)
            eldr.release(w_e)
            jsq.release(w_j)
    for w_e, w_j in active:
        eldr.release(w_e)
        jsq.release(w_j)
    for name, table in per_decoder.items():
        purity = table.max(axis=1).sum() / table.sum()
        print(f"{name:>5}: per-decoder domain counts {table.tolist()}  domain purity {purity:.0%}")
    print(f"in-flight after the stream: eldr {eldr.loads().tolist()}, jsq {jsq.loads().tolist()}")


if __name__ == "__main__":
    main()
