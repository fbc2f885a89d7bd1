"""The simulator's model of the system (bench/simulate.py): decode lengths are honoured, the
capacity is a measured saturation throughput, the eldr online refit fires in simulated time and
swaps aligned centroids into the real Rust router, and TTFT is the prefill queue, the handoff and
the first decode step."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import simulate  # noqa: E402

COST = simulate.CostModel("test", a=1e-3, b=1e-4, c=1e-4, source="test")


def traces(n: int = 240, seed: int = 0) -> simulate.Trace:
    return simulate.synthetic_traces(n, 4, 2, 16, 2, 24, 0.8, seed)


def test_lengths_are_honoured_and_loads_return_to_zero():
    t = traces()
    order = np.arange(60)
    lengths = np.full(60, 5)
    router = simulate.BaselineRouter("jsq", 4)
    res = simulate.simulate(t, order, np.zeros(60), router, 4, COST, 8, use_counts=False, lengths=lengths)
    # every request ran exactly 5 decode steps: with everything queued at t = 0 and batches of 8 on
    # 4 decoders, the step count is at least 60 * 5 / (4 * 8) per decoder in total
    assert res.steps >= 60 * 5 // 8 and int(router.loads().sum()) == 0
    long = simulate.simulate(t, order, np.zeros(60), simulate.BaselineRouter("jsq", 4), 4, COST, 8, use_counts=False)
    assert long.steps > res.steps  # the whole traces (24 tokens) take more steps
    assert np.isfinite(res.finish).all()


def test_capacity_is_the_best_baselines_saturation_throughput():
    t = traces()
    cap = simulate.capacity_rate(t, 4, COST, 8)
    slower = simulate.CostModel("slow", a=2e-3, b=2e-4, c=2e-4, source="test")
    assert cap > 0 and abs(simulate.capacity_rate(t, 4, slower, 8) / cap - 0.5) < 0.05  # twice the step time
    assert simulate.capacity_rate(t, 8, COST, 8) > 1.7 * cap  # twice the decoders


def eldr_with_refit(calib: simulate.Trace, interval_s: float):
    simulate.REFIT = simulate.Refit(interval_s=interval_s, window_s=1.0, min_samples=32)
    try:
        return simulate.make_router("eldr", 4, calib, 0.1, 0, COST)
    finally:
        simulate.REFIT = None


def test_online_refit_swaps_aligned_centroids_in_simulated_time():
    import itertools

    calib, evalset = traces(seed=1), traces(seed=2)
    router, refit = eldr_with_refit(calib, 0.05)
    before = router.centroids().copy()
    order = np.arange(200)
    arrivals = np.cumsum(np.full(200, 0.005))  # 1 s of arrivals: a tick every 0.05 s once 32 have come
    simulate.simulate(evalset, order, arrivals, router, 4, COST, 8, use_counts=True, refit=refit)
    assert refit.fits >= 10 and int(router.loads().sum()) == 0
    assert not np.allclose(router.centroids(), before)

    # One refit on its own: the swapped rows are the new fit in the order closest to the old rows.
    router, refit = eldr_with_refit(calib, 0.5)
    before = router.centroids().copy()
    simulate.simulate(evalset, order[:110], arrivals[:110], router, 4, COST, 8, use_counts=True, refit=refit)
    assert refit.fits == 1
    after = router.centroids()
    sim = after @ before.T
    best = max(sum(sim[i, p[i]] for i in range(4)) for p in itertools.permutations(range(4)))
    assert np.trace(sim) >= best - 1e-5


def test_ttft_is_prefill_queue_counts_handoff_and_the_first_step():
    t = traces()
    n = 40
    order = np.arange(n)
    lengths = np.full(n, 4)
    h = simulate.Handoff(prefill_util=0.7, counts_s=2e-3, handoff_s=10e-3, kv_s_per_token=20e-6)
    prefill = simulate.prefill_seconds(t, COST)[order]
    tokens = simulate.prompt_tokens(t)[order]
    assert (tokens > 0).all() and (prefill > COST.a).all()

    # Sparse arrivals: nobody queues, so TTFT is exactly prefill + counts + handoff + KV + one step.
    arrivals = np.arange(n) * 1.0
    router = simulate.BaselineRouter("jsq", 4)
    res = simulate.simulate(t, order, arrivals, router, 4, COST, 8, use_counts=False, lengths=lengths, handoff=h,
                            prefill_count=1)
    before_step = prefill + h.counts_s + h.handoff_s + h.kv_s_per_token * tokens
    step = res.ttft - before_step
    assert int(router.loads().sum()) == 0
    assert (step > COST.a).all() and (step < COST.a + COST.b + COST.c * 2 * 2 + 1e-9).all()  # one request's step

    # Every request at t = 0 through one prefill server: they leave it one after the other.
    res1 = simulate.simulate(t, order, np.zeros(n), simulate.BaselineRouter("jsq", 4), 4, COST, 8, use_counts=False,
                             lengths=lengths, handoff=h, prefill_count=1)
    res4 = simulate.simulate(t, order, np.zeros(n), simulate.BaselineRouter("jsq", 4), 4, COST, 8, use_counts=False,
                             lengths=lengths, handoff=h, prefill_count=4)
    assert res1.ttft.max() >= prefill.sum()
    assert res4.ttft.max() < 0.5 * res1.ttft.max()
    # Servers are sized to the offered load.
    assert simulate.prefill_servers(t, order, 10 / prefill.mean(), COST, h) == 15
