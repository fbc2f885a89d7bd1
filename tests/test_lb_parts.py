"""Load-balancer parts that need no server: online refit, prefill choice, decode chooser."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from sglang_eldr import fitting
from sglang_eldr import centroids as centroid_file
from sglang_eldr.centroids import CentroidFileError
from sglang_eldr.decode_policy import DecodeChooser
from sglang_eldr.prefill_policy import PrefillPicker, prompt_key
from sglang_eldr.refit import Refitter
from sglang_eldr.router_rs import LocalityBandRouter


def two_domains(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prefs = rng.dirichlet(np.full(16, 0.2), size=(2, 2))
    labels = np.arange(n) % 2
    counts = np.stack([[rng.multinomial(64, prefs[d, l]) for l in range(2)] for d in labels]).astype(np.int32)
    return counts, labels


def test_refit_swaps_aligned_centroids_and_keeps_identities():
    counts, labels = two_domains(80)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    router = LocalityBandRouter(cs.centroids, 0.0, idf=cs.idf, layer_mask=cs.layer_mask)
    zero = np.zeros(2, dtype=np.int64)
    before = [router.select_counts(c, zero) for c in counts]
    refit = Refitter(router, cs.idf, cs.layer_mask, window_s=60, interval_s=1, min_samples=20, seed=1)
    assert not refit.refit_once() and refit.skipped == 1  # empty window
    w = router.acquire(counts[0])
    for c in counts[:40]:
        refit.observe(c)
    assert refit.refit_once() and refit.refits == 1
    after = [router.select_counts(c, zero) for c in counts]
    # New centroids, same decoder identities: each domain keeps its decoder.
    assert np.mean(np.array(before) == np.array(after)) >= 0.95
    assert not np.array_equal(router.centroids(), cs.centroids)
    assert router.loads().tolist()[w] == 1  # in-flight state untouched by the swap
    router.release(w)


def test_a_refit_for_members_that_changed_meanwhile_is_dropped():
    counts, _ = two_domains(80)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    router = LocalityBandRouter(cs.centroids, 0.0, idf=cs.idf, layer_mask=cs.layer_mask)

    class AddDuringFit(Refitter):
        def fit(self, k, space):
            fitted = super().fit(k, space)
            router.add("late")  # a decoder joins while K-means runs
            return fitted

    refit = AddDuringFit(router, cs.idf, cs.layer_mask, window_s=60, interval_s=1, min_samples=20, seed=1)
    for c in counts[:40]:
        refit.observe(c)
    rows = router.centroids().copy()
    assert not refit.refit_once() and refit.dropped == 1 and refit._again  # asked again for the new members
    np.testing.assert_array_equal(router.centroids()[:2], rows)
    assert router.ids() == [0, 1, 2]


def test_prefix_hash_is_sticky_and_yields_to_load():
    picker = PrefillPicker("prefix-hash", load_gate=2)
    key = "def main():\n    return 0\n" * 10
    first = picker.pick(key, [0, 0, 0], [True] * 3)
    assert all(picker.pick(key, [0, 0, 0], [True] * 3) == first for _ in range(5))
    loads = [0, 0, 0]
    loads[first] = 5
    assert picker.pick(key, loads, [True] * 3) != first
    healthy = [True] * 3
    healthy[first] = False
    assert picker.pick(key, [0, 0, 0], healthy) != first
    with pytest.raises(LookupError):
        picker.pick(key, [0, 0, 0], [False] * 3)
    rr = PrefillPicker("rr")
    assert [rr.pick("x", [0, 0], [True, True]) for _ in range(4)] == [0, 1, 0, 1]
    assert prompt_key({"messages": [{"role": "user", "content": "hi"}]}) == "hi"


def keys(n: int) -> list[str]:
    return [f"http://d{k}:1" for k in range(n)]


def test_decode_chooser_validates_configuration():
    counts, _ = two_domains(20)
    cs = fitting.fit(counts, 2, top_k=2)
    with pytest.raises(ValueError, match="2 centroids but 3 decoders"):
        DecodeChooser("eldr-static", keys(3), cs)
    with pytest.raises(ValueError, match="unknown 'lru'"):
        DecodeChooser("lru", keys(2))
    chooser = DecodeChooser("eldr-static", keys(2), cs)
    r = chooser.choose(counts[0])
    assert set(r) >= {"worker", "id", "scores", "band", "loads"}
    assert chooser.refitter is not None and not chooser.refitter.periodic  # membership refits only
    chooser.router.release(r["id"])
    assert chooser.router.loads().tolist() == [0, 0]


def test_membership_changes_keep_loads_health_and_centroid_identities():
    counts, labels = two_domains(200)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    chooser = DecodeChooser("eldr-static", keys(2), cs, tau=0.0, refit_min_samples=10_000)
    router = chooser.router
    rows = router.centroids().copy()
    before = [router.select_counts(c, np.zeros(2, dtype=np.int64)) for c in counts[:40]]
    home = [chooser.choose(c)["id"] for c in counts[:2]]  # one request in flight on each
    assert sorted(home) == [0, 1]
    # Fresh decoder: the mean direction of the others until a refit places it.
    assert router.add("http://new:1", healthy=False) == 2
    chooser.membership_changed()
    assert router.loads().tolist() == [1, 1, 0] and router.healthy() == [True, True, False]
    mean = rows.mean(axis=0)
    np.testing.assert_allclose(router.centroids()[2], mean / np.linalg.norm(mean), rtol=1e-5)
    np.testing.assert_array_equal(router.centroids()[:2], rows)
    # Removing decoder 0 keeps decoder 1's load, health and centroid (now at index 0); the request
    # still on decoder 0 drains as retired.
    assert router.remove(0) == 0
    assert router.loads().tolist() == [1, 0] and router.healthy() == [True, False] and router.in_flight(0) == 1
    np.testing.assert_array_equal(router.centroids()[0], rows[1])
    # Decoder 0 comes back under its key: a new id, its own centroid again, so its domain finds it.
    assert router.add(keys(1)[0]) == 3
    np.testing.assert_array_equal(router.centroids()[2], rows[0])
    assert router.release(0) is False and router.in_flight(0) == 0
    router.set_healthy(2, False)
    after = [router.select_counts(c, np.zeros(3, dtype=np.int64), np.array(router.healthy())) for c in counts[:40]]
    assert after == [{0: 2, 1: 0}[b] for b in before]
    router.release(1)
    assert router.loads().tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="last worker"):
        DecodeChooser("jsq", keys(1)).router.remove(0)
    with pytest.raises(ValueError, match="no worker with id 7"):
        router.remove(7)


def test_a_new_decoder_gets_a_refit_centroid_when_the_window_is_full():
    counts, _ = two_domains(200)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    chooser = DecodeChooser("eldr", keys(2), cs, tau=0.0, refit_min_samples=50)
    router = chooser.router
    for c in counts[:120]:
        router.release(chooser.choose(c)["id"])
    before = [router.select_counts(c, np.zeros(2, dtype=np.int64)) for c in counts[120:]]
    router.add("http://new:1")
    assert chooser.refitter is not None and chooser.refitter.refit_once(membership=True)
    assert chooser.membership_refits == 1 and chooser.num_decoders == 3
    after = [router.select_counts(c, np.zeros(3, dtype=np.int64)) for c in counts[120:]]
    # Three clusters over two domains: the old decoders keep their requests (identities aligned).
    assert np.mean([a == b for a, b in zip(after, before) if a != 2]) >= 0.9
    mean = router.centroids()[:2].mean(axis=0)
    assert not np.allclose(router.centroids()[2], mean / np.linalg.norm(mean), atol=1e-3)
    router.remove(2)
    assert chooser.refitter.refit_once(membership=True)
    assert chooser.membership_refits == 2 and router.centroids().shape[0] == 2


def test_eldr_without_centroids_routes_least_loaded_until_a_file_is_loaded():
    counts, _ = two_domains(200)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    chooser = DecodeChooser("eldr", keys(2), tau=0.0, refit_min_samples=50)
    router = chooser.router
    assert chooser.routing == "least-loaded (no centroids)" and not chooser.has_centroids and chooser.refitter is None
    held = [chooser.choose(c) for c in counts[:3]]
    assert [r["worker"] for r in held] == [0, 1, 0] and all(r["scores"] is None for r in held)  # JSQ
    router.set_healthy(1, False)
    # Membership before centroids only changes the decoder count.
    extra = router.add("http://c:1")
    assert chooser.num_decoders == 3 and router.loads().tolist() == [2, 1, 0]
    assert router.healthy() == [True, False, True]
    with pytest.raises(CentroidFileError, match="2 centroids but 3 decoders"):
        chooser.load_centroids(cs)
    with pytest.raises(CentroidFileError, match="the prefill servers report counts of shape \\[2, 16\\]"):
        chooser.load_centroids(fitting.fit(np.concatenate([counts[:9], counts[:9, :1]], axis=1), 3, top_k=2))
    assert chooser.routing == "least-loaded (no centroids)"
    router.remove(extra)
    # Loaded: locality from now on, in-flight loads and health kept, the online refit armed.
    chooser.load_centroids(cs)
    assert chooser.routing == "locality" and router.loads().tolist() == [2, 1] and router.healthy() == [True, False]
    assert chooser.refitter is not None and chooser.refitter.periodic and chooser.refitter.router is router
    router.set_healthy(1, True)
    r = chooser.choose(counts[3])
    assert r["scores"] is not None and r["band"] is not None
    for h in held + [r]:
        router.release(h["id"])
    assert router.loads().tolist() == [0, 0]
    # A replacement must fit the geometry in use; a refused one leaves the router as it was.
    rows = router.centroids().copy()
    other = fitting.fit(np.concatenate([counts[:8], counts[:8]], axis=1), 2, top_k=2)
    with pytest.raises(CentroidFileError, match="centroids in use are for layers=2"):
        chooser.load_centroids(other)
    np.testing.assert_array_equal(router.centroids(), rows)
    with pytest.raises(CentroidFileError, match="routes by load only"):
        DecodeChooser("jsq", keys(2)).load_centroids(cs)
    # The refit fits in the new space after a replacement.
    for c in counts[:120]:
        router.release(chooser.choose(c)["id"])
    chooser.load_centroids(fitting.fit(counts[100:], 2, top_k=2, seed=3))
    assert chooser.refitter.refit_once()


def test_centroid_bytes_are_validated_like_a_file(tmp_path):
    counts, _ = two_domains(40)
    data = centroid_file.dumps(fitting.fit(counts, 2, top_k=2))
    cs = centroid_file.loads(data)
    assert cs.num_workers == 2 and cs.geometry.layers == 2
    (tmp_path / "c.eldr").write_bytes(data)
    np.testing.assert_array_equal(centroid_file.load(tmp_path / "c.eldr").centroids, cs.centroids)
    for damaged, message in ((data[: len(data) // 2], "not a readable centroid file"),
                             (data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:], "checksum mismatch"),
                             (b"", "not a readable")):
        with pytest.raises(CentroidFileError, match=f"upload: {message}"):
            centroid_file.loads(damaged, source="upload")


def test_refit_uses_the_last_requests_when_few_arrived_in_the_window():
    """A low request rate (or a fleet so large that 16 per decoder never arrive in the window)
    still refits: on the newest `min_samples` requests, whatever their age."""
    counts, _ = two_domains(80)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    router = LocalityBandRouter(cs.centroids, 0.0, idf=cs.idf, layer_mask=cs.layer_mask)
    refit = Refitter(router, cs.idf, cs.layer_mask, window_s=0.05, interval_s=1, min_samples=30, seed=1)
    for c in counts[:40]:
        refit.observe(c)
    time.sleep(0.2)
    assert len(refit.window()) == 0  # nothing in the last 50 ms
    assert refit.refit_once() and refit.refits == 1
    big = Refitter(router, cs.idf, cs.layer_mask, min_samples=10_000, max_samples=512)
    assert big.min_samples(2) == 512  # never more than the window keeps
    big.close()
    refit.close()


def test_the_online_refit_fires_by_request_count():
    counts, _ = two_domains(200)
    cs = fitting.fit(counts, 2, top_k=2, seed=0)
    chooser = DecodeChooser("eldr", keys(2), cs, refit_interval_s=3600, refit_min_samples=50, refit_every=60)
    refitter = chooser.refitter
    assert refitter is not None and refitter.every == 60

    async def run() -> int:
        task = asyncio.create_task(refitter.run())
        for c in counts[:70]:
            chooser.router.release(chooser.choose(c)["id"])
            await asyncio.sleep(0)
        deadline = time.monotonic() + 60
        while refitter.refits == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        return refitter.refits

    assert asyncio.run(run()) == 1  # an hour-long interval, yet 60 requests triggered it
    assert refitter.membership_refits == 0
    refitter.close()
    with pytest.raises(ValueError, match="refit every"):
        DecodeChooser("eldr", keys(2), cs, refit_every=0)


def test_marginal_learns_top_k_from_the_first_counts_report():
    chooser = DecodeChooser("marginal", keys(2))
    assert chooser.routing == "expected experts" and chooser.router.geometry is None
    counts = np.zeros((4, 8), dtype=np.int32)
    counts[:, :3] = 10  # 10 prompt tokens, top-3 per layer
    bad = counts.copy()
    bad[2, 0] += 1  # layer 2 counts one pick too many
    with pytest.raises(ValueError, match="not one multiple"):
        chooser.choose(bad, 10)
    with pytest.raises(ValueError, match="cannot learn top-k"):
        chooser.choose(counts, 0)
    assert chooser.router.geometry is None  # nothing learnt from bad reports
    first = chooser.choose(counts, 10)
    assert chooser.router.geometry == (4, 8, 3) and first["ticket"] is not None
    other = counts[:, ::-1].copy()  # disjoint experts: on the busy decoder both requests would wait for them
    second = chooser.choose(other, 10)
    assert second["worker"] != first["worker"] and len(second["costs"]) == 2
    for r in (first, second):
        chooser.router.release(r["id"], r["ticket"])
    assert list(chooser.router.loads()) == [0, 0] and chooser.router.expected_distinct() == [0.0, 0.0]
    with pytest.raises(ValueError, match="--refit is for the eldr policy"):
        DecodeChooser("marginal", keys(2), online_refit=False)
