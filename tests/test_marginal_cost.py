"""The marginal-cost policy (Rust, through the real extension) against a NumPy reference that
recomputes every decoder's expected experts from the requests it holds: the same costs and the same
choices (with and without a batch cap) over random sequences of acquires, releases, health changes
and membership changes, and
clear errors that leave the state as it was."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_eldr.router_rs import BaselineRouter, MarginalCostRouter

Q_MAX = 0.95


def frequencies(counts: np.ndarray, top_k: int, sharpness: float = 2.0) -> np.ndarray:
    c = counts.astype(np.float64) ** sharpness
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
    cap = data.draw(st.one_of(st.none(), st.integers(1, 4)))
    gamma = data.draw(st.one_of(st.just(1.0), st.just(2.0), st.floats(0.125, 8.0)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    router = MarginalCostRouter(a, b, c, num_workers=workers, layers=layers, experts=experts, top_k=top_k,
                                batch_cap=cap, sharpness=gamma)
    assert router.batch_cap == cap and router.sharpness == gamma
    ref = Reference(workers, top_k, a, b, c, layers * experts)
    members = list(router.ids())  # ref.held[k] is members[k]
    where: dict[int, int] = {}  # ticket -> member id
    added = 0
    for _ in range(data.draw(st.integers(1, 30))):
        roll = rng.random()
        if where and roll < 0.3:
            ticket = int(rng.choice(list(where)))
            wid = where.pop(ticket)
            assert router.release(wid, ticket) == (wid in members)
            if wid in members:
                del ref.held[members.index(wid)][ticket]
            continue
        if roll < 0.38 and len(members) > 1:  # a member leaves; its requests release nothing
            k = int(rng.integers(len(members)))
            router.remove(members[k])
            members.pop(k)
            ref.held.pop(k)
            continue
        if roll < 0.44:
            added += 1
            members.append(router.add(f"new-{added}"))
            ref.held.append({})
            continue
        healthy = [bool(h) for h in rng.random(len(members)) < 0.85]
        for wid, h in zip(members, healthy):
            router.set_healthy(wid, h)
        if not any(healthy):
            with pytest.raises(ValueError, match="unhealthy"):
                router.acquire_with_receipt(None)
            continue
        counts = None if rng.random() < 0.15 else rng.integers(0, 30, (layers, experts)).astype(np.int32)
        q = np.zeros(layers * experts) if counts is None else frequencies(counts, top_k, gamma)
        want = ref.costs(q, healthy)
        loads = [len(h) for h in ref.held]
        got = router.acquire_with_receipt(counts)
        np.testing.assert_allclose(got["costs"], want, rtol=1e-9, atol=1e-12)
        assert got["loads"] == loads
        w = got["worker"]
        assert healthy[w] and got["id"] == members[w]
        # The minimum among healthy decoders with room under the cap (all healthy ones when none has
        # room), ties (within rounding) to fewer in flight, then the lower index.
        room = [k for k in range(len(members)) if healthy[k] and (cap is None or loads[k] < cap)]
        pool = room or [k for k in range(len(members)) if healthy[k]]
        best = min(want[k] for k in pool)
        tied = [k for k in pool if want[k] <= best + 1e-9 * max(1.0, abs(best))]
        assert w in tied
        if all(abs(want[k] - best) == 0 for k in tied):
            assert w == min(tied, key=lambda k: (loads[k], k))
        where[got["ticket"]] = got["id"]
        ref.held[w][got["ticket"]] = q
        assert list(router.loads()) == [len(h) for h in ref.held]
    for ticket, wid in list(where.items()):
        router.release(wid, ticket)
    assert list(router.loads()) == [0] * len(members)
    assert router.expected_distinct() == [0.0] * len(members)


def test_bad_input_is_refused_and_changes_nothing():
    router = MarginalCostRouter(1.0, 0.1, 0.01, num_workers=2, layers=2, experts=4, top_k=2)
    ok = np.ones((2, 4), dtype=np.int64)
    first = router.acquire_with_receipt(ok)
    wid, ticket = first["id"], first["ticket"]
    with pytest.raises(ValueError, match=r"counts: expected shape \[2, 4\]"):
        router.acquire_with_receipt(np.ones((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="negative"):
        router.acquire_with_receipt(np.array([[1, -1, 0, 0], [0, 0, 0, 0]], dtype=np.int32))
    with pytest.raises(ValueError, match="not a signature"):
        router.acquire_with_receipt(np.ones(8, dtype=np.float32))
    with pytest.raises(ValueError, match="releases by ticket"):
        router.acquire(ok)
    with pytest.raises(ValueError, match="ticket"):
        router.release(wid)
    with pytest.raises(ValueError, match="not in flight"):
        router.release(wid, ticket + 100)
    other = router.ids()[1]
    with pytest.raises(ValueError, match="issued for worker"):
        router.release(other, ticket)
    assert list(router.loads()) == [1, 0]  # nothing of it happened
    assert router.release(wid, ticket) is True
    with pytest.raises(ValueError, match="not in flight"):
        router.release(wid, ticket)
    for bad in ({"num_workers": 0, "layers": 2, "experts": 4, "top_k": 1},
                {"num_workers": 2, "layers": 2, "experts": 4, "top_k": 5},
                {"num_workers": 2, "layers": 0, "experts": 4, "top_k": 1},
                {"num_workers": 2, "layers": 2}):
        with pytest.raises(ValueError):
            MarginalCostRouter(1.0, 1.0, 1.0, **bad)
    with pytest.raises(ValueError, match="cost.b"):
        MarginalCostRouter(1.0, -1.0, 1.0, num_workers=2)
    for gamma in (0.0, -1.0, 9.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sharpness: must be in"):
            MarginalCostRouter(num_workers=2, sharpness=gamma)


def test_sharpness_changes_the_choice():
    """Decoder 0 runs x, decoder 1 runs y; the newcomer's costs follow the reference at each
    sharpness, and here the choice flips: raw counts (1) put it on decoder 0, squared ones (2, the
    default) on decoder 1, where its heaviest experts overlap more."""
    geometry = {"num_workers": 2, "layers": 1, "experts": 4, "top_k": 1}
    x, y, new = (np.array([v], dtype=np.int32) for v in ([4, 8, 4, 2], [4, 6, 6, 1], [5, 2, 3, 7]))
    picks = []
    for gamma in (1.0, 2.0):
        router = MarginalCostRouter(0.0, 0.0, 1.0, sharpness=gamma, **geometry)
        assert router.sharpness == gamma
        assert [router.acquire_with_receipt(r)["worker"] for r in (x, y)] == [0, 1]
        ref = Reference(2, 1, 0.0, 0.0, 1.0, 4)
        ref.held = [{1: frequencies(x, 1, gamma)}, {2: frequencies(y, 1, gamma)}]
        got = router.acquire_with_receipt(new)
        want = ref.costs(frequencies(new, 1, gamma), [True, True])
        np.testing.assert_allclose(got["costs"], want, rtol=1e-12)
        assert got["worker"] == int(np.argmin(want))
        picks.append(got["worker"])
    assert picks == [0, 1]
    assert MarginalCostRouter(num_workers=2).sharpness == 2.0
    assert BaselineRouter("jsq", 2).sharpness is None


def test_geometry_can_come_later():
    """Before the geometry is known (the load balancer learns it from the first counts report) a
    request is placed by load; counts are refused until then; the geometry is set once."""
    router = MarginalCostRouter(num_workers=2)
    assert router.geometry is None and router.policy == "marginal" and router.step_cost == (0.0, 0.0, 1.0)
    before = router.acquire_with_receipt(None)
    with pytest.raises(ValueError, match="no model geometry"):
        router.acquire_with_receipt(np.ones((2, 4), dtype=np.int32))
    router.set_geometry(2, 4, 1)
    router.set_geometry(2, 4, 1)
    with pytest.raises(ValueError, match="already"):
        router.set_geometry(2, 4, 2)
    after = router.acquire_with_receipt(np.ones((2, 4), dtype=np.int32))
    assert after["worker"] != before["worker"]
    router.release(before["id"], before["ticket"])
    router.release(after["id"], after["ticket"])
    assert list(router.loads()) == [0, 0] and router.expected_distinct() == [0.0, 0.0]
    with pytest.raises(ValueError, match="only the marginal"):
        BaselineRouter("jsq", 2).set_geometry(2, 4, 1)


def test_locality_wins_only_when_it_pays():
    """Two request kinds on disjoint experts: with experts expensive they separate by kind; with
    experts free the policy spreads by load alone."""
    x = np.array([[8, 0, 0, 0], [8, 0, 0, 0]], dtype=np.int32)
    y = np.array([[0, 0, 0, 8], [0, 0, 0, 8]], dtype=np.int32)
    geometry = {"num_workers": 2, "layers": 2, "experts": 4, "top_k": 1}
    costly = MarginalCostRouter(0.0, 0.01, 1.0, **geometry)
    placed = [costly.acquire_with_receipt(r)["worker"] for r in (x, y, x, y, x, y)]
    assert placed[0::2] == [placed[0]] * 3 and placed[1::2] == [placed[1]] * 3 and placed[0] != placed[1]
    free = MarginalCostRouter(1.0, 1.0, 0.0, **geometry)
    assert [free.acquire_with_receipt(r)["worker"] for r in (x, x, x, x)] == [0, 1, 0, 1]
