"""Refits run off the event loop: a membership change asks for a refit on a full window (4096
requests, the window's cap), and requests routed on the loop meanwhile are not held up by it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from orphans import assert_child_ends_with_parent

from sglang_eldr import fitting
from sglang_eldr.decode_policy import DecodeChooser

LAYERS, EXPERTS, TOP_K, DECODERS, WINDOW = 24, 128, 8, 16, 4096
# Measured on the 2-core rig: with the fit in the fit process the 99th percentile of the added
# wait is 2-4 ms; with the fit in the worker thread (OR-Tools holding the GIL through each solve)
# it is 34-41 ms. The maximum does not tell them apart (a scheduler hiccup on a shared machine
# reaches 50-60 ms either way), so the test bounds the 99th percentile, and the maximum only
# against a stall of the whole fit.
P99_ADDED_S = 0.015
MAX_ADDED_S = 0.500


def prompts(n: int, seed: int = 0) -> np.ndarray:
    """Counts of 128-token prompts from 8 domains, each with its own expert preferences."""
    rng = np.random.default_rng(seed)
    prefs = rng.dirichlet(np.full(EXPERTS, 0.1), size=(8, LAYERS))
    domains = rng.integers(0, 8, size=n)
    return np.stack([[rng.multinomial(128 * TOP_K, prefs[d, l]) for l in range(LAYERS)] for d in domains]).astype(np.int32)


async def probe(chooser: DecodeChooser, counts: np.ndarray, i: int, pause_s: float = 0.002) -> float:
    """One request's router work after a short await; returns the time beyond the await."""
    t = time.perf_counter()
    await asyncio.sleep(pause_s)
    chooser.router.release(chooser.choose(counts[i % len(counts)])["id"])
    return time.perf_counter() - t - pause_s


def test_requests_keep_flowing_during_a_membership_refit_of_a_full_window():
    counts = prompts(WINDOW)
    keys = [f"http://d{k}:1" for k in range(DECODERS)]
    cs = fitting.fit(counts[:1024], DECODERS, top_k=TOP_K, seed=0)
    chooser = DecodeChooser("eldr", keys, cs, refit_window_s=3600, refit_interval_s=3600,
                            refit_min_samples=WINDOW - 256)  # requests keep arriving while it reads the window
    refitter = chooser.refitter
    assert refitter is not None
    for c in counts:
        chooser.router.release(chooser.choose(c)["id"])
    assert len(refitter.window()) == WINDOW

    async def run() -> tuple[list[float], list[float], float]:
        task = asyncio.create_task(refitter.run())
        idle = [await probe(chooser, counts, i) for i in range(100)]
        chooser.router.add("http://new:1")
        chooser.membership_changed()
        busy: list[float] = []
        started = time.perf_counter()
        while chooser.membership_refits == 0 and time.perf_counter() - started < 120:
            busy.append(await probe(chooser, counts, len(busy)))
        took = time.perf_counter() - started
        task.cancel()
        return idle, busy, took

    idle, busy, took = asyncio.run(run())
    assert refitter.last_error is None and refitter.skipped == 0, (refitter.last_error, refitter.skipped)
    assert chooser.membership_refits == 1 and chooser.router.centroids().shape[0] == DECODERS + 1
    assert len(busy) >= 20, f"the refit took {took:.2f} s but only {len(busy)} requests ran meanwhile"
    added = np.asarray(busy) - float(np.median(idle))
    p99, worst = float(np.percentile(added, 99)), float(added.max())
    print(f"refit of {WINDOW} samples took {took:.2f} s; {len(busy)} requests meanwhile, added p99 "
          f"{p99 * 1e3:.1f} ms, max {worst * 1e3:.1f} ms (idle median {np.median(idle) * 1e3:.2f} ms)")
    assert p99 <= P99_ADDED_S, f"1 % of requests waited {p99 * 1e3:.1f} ms or more extra while the refit ran"
    assert worst <= MAX_ADDED_S, f"a request waited {worst * 1e3:.1f} ms extra while the refit ran"
    assert chooser.router.loads().tolist() == [0] * (DECODERS + 1)


CHILD = """
import sys, time
import numpy as np
from sglang_eldr import fitting
from sglang_eldr.router_rs import LocalityBandRouter
from sglang_eldr.refit import Refitter
if __name__ == "__main__":
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(200, 2, 16)).astype(np.int32)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    router = LocalityBandRouter(cs.centroids, 0.0, idf=cs.idf, layer_mask=cs.layer_mask)
    refit = Refitter(router, cs.idf, cs.layer_mask, window_s=60, min_samples=20)
    for c in counts:
        refit.observe(c)
    assert refit.refit_once()
    print(*refit._pool._processes, flush=True)
    time.sleep(120)
"""


def test_a_killed_router_leaves_no_fit_process_behind(tmp_path):
    script = tmp_path / "router.py"
    script.write_text(CHILD)
    assert_child_ends_with_parent(script, what="fit process")
