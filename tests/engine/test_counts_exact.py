"""Counts from a real server: invariants and exactness with radix-cache prefix hits, chunked prefill,
page size 16 (page storage) and KV eviction."""

from __future__ import annotations

import numpy as np
import pytest

from tests.engine.helpers import counts_of, token_ids

pytestmark = pytest.mark.needs_engine

TOP_K = 4


def _shape(server):
    r = server.generate(token_ids(3, 999))
    return tuple(r["meta_info"]["eldr_counts_shape"])


def test_shape_and_row_sums(eldr_server):
    L, E = _shape(eldr_server)
    assert (L, E) == (4, 64)
    for n in (1, 2, 17, 300):
        r = eldr_server.generate(token_ids(n, 100 + n))
        c = counts_of(r)
        assert c.dtype == np.int32 and c.shape == (L, E)
        assert r["meta_info"]["prompt_tokens"] == n
        assert (c.sum(axis=1) == n * TOP_K).all(), c.sum(axis=1)
        assert (c >= 0).all()


def test_counts_only_when_asked(eldr_server):
    for flag in (None, False):
        r = eldr_server.generate(token_ids(20, 5), counts=flag)
        assert "eldr_counts" not in r["meta_info"] and "eldr_counts_shape" not in r["meta_info"]


def test_prefix_hit_counts_equal_cold(eldr_server):
    """Prompts sharing a 240-token prefix: counts with the prefix served from the radix cache are
    bit-identical to counts of the same prompt on a cold cache."""
    s = eldr_server
    prefix = token_ids(240, 1)
    prompts = [prefix + token_ids(60, 10 + i) for i in range(3)]
    cold = []
    for p in prompts:
        s.flush_cache()
        r = s.generate(p)
        assert r["meta_info"]["cached_tokens"] == 0
        cold.append(counts_of(r))
    s.flush_cache()
    s.generate(prefix + token_ids(30, 77))  # warm the prefix with a different suffix
    for p, c in zip(prompts, cold):
        r = s.generate(p)
        assert r["meta_info"]["cached_tokens"] >= len(prefix)
        np.testing.assert_array_equal(counts_of(r), c)
    # full hit: the whole prompt but its last token comes from the cache
    r = s.generate(prompts[0])
    assert r["meta_info"]["cached_tokens"] == len(prompts[0]) - 1
    np.testing.assert_array_equal(counts_of(r), cold[0])


def test_batched_requests_equal_single(eldr_server):
    """Several prompts in one /generate batch get the same counts as one at a time."""
    s = eldr_server
    prompts = [token_ids(50 + 13 * i, 200 + i) for i in range(4)]
    single = []
    for p in prompts:
        s.flush_cache()
        single.append(counts_of(s.generate(p)))
    s.flush_cache()
    status, body = s.post("/generate", {
        "input_ids": prompts, "return_eldr_counts": True,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}})
    assert status == 200, body
    for b, c in zip(body, single):
        np.testing.assert_array_equal(counts_of(b), c)


def test_output_tokens_in_later_prefix(eldr_server):
    """The radix cache also caches generated tokens; a follow-up prompt that contains them gets rows
    that were written by decode steps. Row sums stay exact."""
    s = eldr_server
    s.flush_cache()
    p = token_ids(40, 3)
    r = s.generate(p, max_new_tokens=12)
    follow = p + r["output_ids"] + token_ids(10, 4)
    r2 = s.generate(follow)
    assert r2["meta_info"]["cached_tokens"] >= len(p)
    c = counts_of(r2)
    assert (c.sum(1) == len(follow) * TOP_K).all()


def test_chunked_paged_eviction_exact(eldr_paged_server):
    """--chunked-prefill-size 64 (< prompt), --page-size 16 with page storage, and a 1024-token KV pool:
    counts of a prompt are identical cold, with its prefix cached, and after its prefix was evicted."""
    s = eldr_paged_server
    L, E = _shape(s)
    prefix = token_ids(200, 21)  # not a multiple of 16: the prompt's last page is partial
    prompt = prefix + token_ids(57, 22)
    s.flush_cache()
    r_cold = s.generate(prompt)
    cold = counts_of(r_cold)
    assert (cold.sum(1) == len(prompt) * TOP_K).all()
    # prefix hit (page-aligned part of the shared prefix)
    s.flush_cache()
    s.generate(prefix + token_ids(40, 23))
    r_hit = s.generate(prompt)
    assert r_hit["meta_info"]["cached_tokens"] >= 192
    np.testing.assert_array_equal(counts_of(r_hit), cold)
    # eviction pressure: many distinct prompts through a 1024-token pool, each checked for row sums
    for i in range(12):
        q = token_ids(150 + 7 * i, 300 + i)
        cq = counts_of(s.generate(q, max_new_tokens=4))
        assert (cq.sum(1) == len(q) * TOP_K).all()
    r_after = s.generate(prompt)
    assert r_after["meta_info"]["cached_tokens"] < len(prefix), "the prefix should have been evicted"
    np.testing.assert_array_equal(counts_of(r_after), cold)
    # and once more, now hitting what the evicted-and-recomputed run wrote
    r_again = s.generate(prompt)
    assert r_again["meta_info"]["cached_tokens"] >= 192
    np.testing.assert_array_equal(counts_of(r_again), cold)


def test_paged_concurrent_requests_exact(eldr_paged_server):
    """Concurrent chunked requests sharing the pool (and the scheduler's batches) keep exact counts."""
    import concurrent.futures as cf

    s = eldr_paged_server
    prompts = [token_ids(90 + 11 * i, 400 + i) for i in range(6)]
    solo = []
    for p in prompts:
        s.flush_cache()
        solo.append(counts_of(s.generate(p)))
    s.flush_cache()
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: counts_of(s.generate(p, max_new_tokens=6)), prompts))
    for g, c in zip(got, solo):
        np.testing.assert_array_equal(g, c)
