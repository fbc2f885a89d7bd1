"""The marginal-cost policy (Rust, through the real extension) against a NumPy reference that
recomputes every decoder's expected experts from the requests it holds: the same costs and the same
choices over random sequences of acquires and releases, and clear errors that leave the state as it was."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_eldr.router_rs import MarginalCostRouter

Q_MAX = 0.95


def frequencies(counts: np.ndarray, top_k: int) -> np.ndarray:
    c = counts.astype(np.float64)
    total = c.sum(axis=1, keepdims=True)
    q = np.divide(top_k * c, total, out=np.zeros_like(c), where=total > 0)
    return np.minimum(q, Q_MAX).ravel()


class Reference:
    def __init__(self, workers: int, top_k: int, a: float, b: float, c: float, pairs: int):
        self.top_k, self.a, self.b, self.c, self.pairs = top_k, a, b, c, pairs
        self.held: list[dict[int, np.ndarray]] = [{} for _ in range(workers)]

    def costs(self, q: np.ndarray, healthy: list[bool]) -> np.ndarray:
        out = []
        for d, reqs in enumerate(self.held):
            if not healthy[d]:
                out.append(np.inf)
                continue
            keep = np.prod([1 - x for x in reqs.values()], axis=0) if reqs else np.ones(self.pairs)
            n, distinct, new = len(reqs), float((1 - keep).sum()), float(q @ keep)
            step = self.a + self.b * n + self.c * distinct
            out.append(step + self.b + self.c * new + n * (self.b + self.c * new))
        return np.array(out)


@settings(max_examples=60, deadline=None)
@given(workers=st.integers(1, 6), layers=st.integers(1, 4), experts=st.integers(2, 12), data=st.data(),
       a=st.floats(0, 2), b=st.floats(0, 2), c=st.floats(0, 2))
def test_matches_the_reference(workers, layers, experts, data, a, b, c):
    top_k = data.draw(st.integers(1, experts))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    router = MarginalCostRouter(workers, layers, experts, top_k, a, b, c)
    ref = Reference(workers, top_k, a, b, c, layers * experts)
    where: dict[int, int] = {}
    for _ in range(data.draw(st.integers(1, 25))):
        if where and rng.random() < 0.35:
            ticket = int(rng.choice(list(where)))
            assert router.release(ticket) == where[ticket]
            del ref.held[where.pop(ticket)][ticket]
            continue
        healthy = [bool(h) for h in rng.random(workers) < 0.85]
        if not any(healthy):
            with pytest.raises(ValueError, match="unhealthy"):
                router.acquire(None, healthy)
            continue
        counts = None if rng.random() < 0.15 else rng.integers(0, 30, (layers, experts)).astype(np.int32)
        q = np.zeros(layers * experts) if counts is None else frequencies(counts, top_k)
        want = ref.costs(q, healthy)
        loads = [len(h) for h in ref.held]
        got = router.acquire_with_costs(counts, healthy)
        np.testing.assert_allclose(got["costs"], want, rtol=1e-9, atol=1e-12)
        assert got["loads"] == loads
        w = got["worker"]
        assert healthy[w]
        # The minimum, ties (within rounding) to fewer in flight, then the lower index.
        best = min(want[k] for k in range(workers) if healthy[k])
        tied = [k for k in range(workers) if healthy[k] and want[k] <= best + 1e-9 * max(1.0, abs(best))]
        assert w in tied
        if all(abs(want[k] - best) == 0 for k in tied):
            assert w == min(tied, key=lambda k: (loads[k], k))
        where[got["ticket"]] = w
        ref.held[w][got["ticket"]] = q
        assert list(router.loads()) == [len(h) for h in ref.held]
    for ticket in list(where):
        router.release(ticket)
    assert list(router.loads()) == [0] * workers
    assert router.expected_distinct() == [0.0] * workers


def test_bad_input_is_refused_and_changes_nothing():
    router = MarginalCostRouter(2, 2, 4, 2, 1.0, 0.1, 0.01)
    ok = np.ones((2, 4), dtype=np.int64)
    _, ticket = router.acquire(ok)
    with pytest.raises(ValueError, match=r"counts: expected shape \[2, 4\]"):
        router.acquire(np.ones((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="negative"):
        router.acquire(np.array([[1, -1, 0, 0], [0, 0, 0, 0]], dtype=np.int32))
    with pytest.raises(ValueError, match="not a signature"):
        router.acquire(np.ones(8, dtype=np.float32))
    with pytest.raises(ValueError, match="healthy"):
        router.acquire(ok, [True])
    with pytest.raises(ValueError, match="not in flight"):
        router.release(ticket + 100)
    assert list(router.loads()) == [1, 0]
    assert router.release(ticket) == 0
    with pytest.raises(ValueError, match="not in flight"):
        router.release(ticket)
    for bad in ((0, 2, 4, 1), (2, 2, 4, 5), (2, 0, 4, 1)):
        with pytest.raises(ValueError):
            MarginalCostRouter(*bad, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="cost.b"):
        MarginalCostRouter(2, 2, 4, 1, 1.0, -1.0, 1.0)


def test_locality_wins_only_when_it_pays():
    """Two request kinds on disjoint experts: with experts expensive they separate by kind; with
    experts free the policy spreads by load alone."""
    x = np.array([[8, 0, 0, 0], [8, 0, 0, 0]], dtype=np.int32)
    y = np.array([[0, 0, 0, 8], [0, 0, 0, 8]], dtype=np.int32)
    costly = MarginalCostRouter(2, 2, 4, 1, 0.0, 0.01, 1.0)
    placed = [costly.acquire(r)[0] for r in (x, y, x, y, x, y)]
    assert placed[0::2] == [placed[0]] * 3 and placed[1::2] == [placed[1]] * 3 and placed[0] != placed[1]
    free = MarginalCostRouter(2, 2, 4, 1, 1.0, 1.0, 0.0)
    assert [free.acquire(r)[0] for r in (x, x, x, x)] == [0, 1, 0, 1]
