"""ELDR PD serving on a real CPU cluster: prefill first, decoder chosen from its expert counts."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from sglang_eldr import centroids as centroid_file
from sglang_eldr.decode_policy import DECODE_POLICIES
from sglang_eldr.router_rs import LocalityBandRouter
from sglang_eldr.wire import counts_from_meta

from .conftest import EVAL, rows
from .helpers import decode_rows

PARAMS = {"temperature": 0, "max_new_tokens": 12}
TAU = 0.1  # the cluster's default band


def pick_prompts(n_per_domain: int) -> list[dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows(EVAL):
        by[r["domain"]].append(r)
    return [r for d in sorted(by) for r in by[d][:n_per_domain]]


def generate(url: str, text: str, **extra) -> dict:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": PARAMS, **extra}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def decode_in_flight(url: str) -> list[int]:
    return [w["in_flight"] for w in decode_rows(url)]


def check_receipt(route: dict, policy: str, decoders: list[str], prefill: str) -> None:
    assert route["policy"] == policy
    assert route["prefill"] == prefill
    assert route["decoder"] in decoders
    assert len(route["loads"]) == len(decoders) and min(route["loads"]) >= 0
    chosen = decoders.index(route["decoder"])
    if policy.startswith("eldr") and route.get("fallback") is None:
        scores, band = route["scores"], route["band"]
        assert len(scores) == len(decoders) and chosen in band
        within = [k for k in range(len(scores)) if scores[k] >= max(scores) - TAU - 1e-6]
        # the band is everything within tau of the best, plus the nearest alternative if that is alone
        assert sorted(band) == within or (len(within) == 1 and len(band) == 2 and within[0] in band), (band, scores)
        # least loaded inside the band, load ties to the better score
        assert route["loads"][chosen] == min(route["loads"][k] for k in band)
        tied = [k for k in band if route["loads"][k] == route["loads"][chosen]]
        assert scores[chosen] == max(scores[k] for k in tied)
    elif policy == "jsq":
        assert route["loads"][chosen] == min(route["loads"])
    elif policy == "marginal":
        # it learnt the geometry from the first counts and chose the least predicted slow-down
        assert route.get("fallback") is None and route.get("scores") is None, route
        costs = route["costs"]
        assert len(costs) == len(decoders) and costs[chosen] == min(costs), route
    else:
        assert route.get("scores") is None


@pytest.mark.parametrize("policy", DECODE_POLICIES)
def test_outputs_identical_to_a_single_server_for_every_policy(cluster, centroids, reference_server, policy):
    prompts = pick_prompts(1)
    router = cluster.start_router(policy=policy, centroids=centroids)
    with ThreadPoolExecutor(3) as pool:
        pd = list(pool.map(lambda p: generate(router.url, p["text"]), prompts))
    decoders = [d.url for d in cluster.decoders]
    for p, res in zip(prompts, pd):
        ref = generate(reference_server.url, p["text"])
        assert res["output_ids"] == ref["output_ids"], (policy, p["domain"])
        check_receipt(res["meta_info"]["eldr_route"], policy, decoders, cluster.prefills[0].url)
    assert decode_in_flight(router.url) == [0, 0]
    if policy == "marginal":  # every request's expected experts left with it
        assert [w["expected_distinct_pairs"] for w in decode_rows(router.url)] == [0.0, 0.0]


def test_domains_concentrate_on_their_decoder(cluster, centroids):
    """Sequential requests (loads stay equal): each domain's requests land on the decoder whose
    centroid is nearest, so a domain's share on its main decoder is well above chance."""
    router = cluster.start_router(policy="eldr-static", centroids=centroids)
    prompts = pick_prompts(6)
    placed: dict[str, Counter] = defaultdict(Counter)
    cs = centroid_file.load(centroids)
    offline = LocalityBandRouter(cs.centroids, 0.0, idf=cs.idf, layer_mask=cs.layer_mask)
    decoders = [d.url for d in cluster.decoders]
    agree = 0
    for p in prompts:
        res = generate(router.url, p["text"], return_eldr_counts=True)
        route = res["meta_info"]["eldr_route"]
        assert route.get("fallback") is None, route
        placed[p["domain"]][route["decoder"]] += 1
        counts = counts_from_meta(res["meta_info"])
        agree += decoders[offline.select_counts(counts, np.zeros(2, dtype=np.int64))] == route["decoder"]
    shares = {d: c.most_common(1)[0][1] / sum(c.values()) for d, c in placed.items()}
    mean_share = float(np.mean(list(shares.values())))
    print(f"per-domain share on the main decoder: {shares}; mean {mean_share:.2f}")
    assert agree == len(prompts), "the router's choice differs from the nearest centroid of the request's counts"
    assert mean_share >= 0.75, shares
    # Both decoders get work: locality does not collapse onto one decoder.
    assert len({dec for c in placed.values() for dec in c}) == 2
    assert decode_in_flight(router.url) == [0, 0]


def test_streaming_generate_and_openai_completions(cluster, centroids, reference_server):
    router = cluster.start_router(policy="eldr", centroids=centroids)
    text = pick_prompts(1)[0]["text"]
    ref = generate(reference_server.url, text)
    with requests.post(router.url + "/generate", json={"text": text, "sampling_params": PARAMS, "stream": True},
                       stream=True, timeout=300) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:") and line != b"data: [DONE]"]
    assert chunks and all("eldr_route" in c["meta_info"] for c in chunks)
    assert chunks[-1]["text"] == ref["text"]
    r = requests.post(router.url + "/v1/completions", json={"model": "m", "prompt": text, "max_tokens": 12,
                                                             "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == ref["text"]
    assert body["eldr_route"]["policy"] == "eldr"
    assert decode_in_flight(router.url) == [0, 0]


def test_counts_that_never_arrive_fall_back_to_jsq(cluster, centroids):
    """A prefill whose counts never reach the router: after the deadline the request is routed
    least-loaded, answered, and the fallback is counted in /metrics."""
    from sglang_eldr.launch_cluster import free_port

    p = cluster.prefills[0]
    router = cluster.start_router(policy="eldr", centroids=centroids, extra=[
        "--counts-deadline", "0.5",
    ], prefill_counts_port=free_port("127.0.0.1"))
    res = generate(router.url, pick_prompts(1)[0]["text"])
    route = res["meta_info"]["eldr_route"]
    assert route["fallback"] == "counts-timeout" and route["scores"] is None
    metrics = requests.get(router.url + "/metrics", timeout=5).text
    assert 'eldr_fallbacks_total{reason="counts-timeout"} 1.0' in metrics
    assert decode_in_flight(router.url) == [0, 0]
    assert p.proc.poll() is None


def test_bad_requests_get_clear_errors_and_the_router_keeps_serving(cluster, centroids):
    router = cluster.start_router(policy="eldr", centroids=centroids)
    r = requests.post(router.url + "/generate", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(router.url + "/generate", json={"text": ["a", "b"]}, timeout=10)
    assert r.status_code == 400 and "batched" in r.json()["error"]["message"]
    r = requests.post(router.url + "/generate", json={"text": "x", "stream": "yes"}, timeout=10)
    assert r.status_code == 400
    r = requests.post(router.url + "/generate", json={"text": "x", "sampling_parms": {}}, timeout=10)
    assert r.status_code == 400 and "unknown field 'sampling_parms'" in r.json()["error"]["message"]
    # Checked by SGLang on the prefill server, passed back with its status and message.
    r = requests.post(router.url + "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": "4"}},
                      timeout=30)
    assert r.status_code == 400 and "expected i64" in r.json()["error"]["message"], r.text
    r = requests.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": "many"},
                      timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"], r.text
    for stream in (False, True):
        r = requests.post(router.url + "/generate", json={"text": "word " * 5000, "stream": stream}, timeout=60)
        assert r.status_code == 400 and "longer than the model's context length" in r.json()["error"]["message"]
    r = requests.post(router.url + "/generate", data=b'{"text": "' + b"x" * (17 << 20) + b'"}', timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
    assert generate(router.url, "def main():")["meta_info"]["eldr_route"]["policy"] == "eldr"
    assert decode_in_flight(router.url) == [0, 0]
