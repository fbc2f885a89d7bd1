"""Workers added and removed at runtime (POST/DELETE /workers) on the real cluster."""

from __future__ import annotations

import json
from urllib.parse import quote

import requests

from sglang_eldr.launch_cluster import free_port

from .conftest import EVAL, rows
from .helpers import all_idle, open_stream, wait_for, workers


def generate(url: str, text: str) -> dict:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 6}},
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]["eldr_route"]


def by_domain(n: int) -> list[str]:
    seen: dict[str, list[str]] = {}
    for r in rows(EVAL):
        seen.setdefault(r["domain"], []).append(r["text"])
    return [t for texts in seen.values() for t in texts[:n]]


def test_decoders_removed_and_added_at_runtime(cluster, centroids):
    # tau 0: each prompt goes to its nearest centroid whatever the loads (within the guard).
    router = cluster.start_router(policy="eldr-static", centroids=centroids, extra=["--tau", "0"])
    a, b = cluster.decoders
    prompts = by_domain(2)
    receipts = {t: generate(router.url, t) for t in prompts}
    before = {t: r["decoder"] for t, r in receipts.items()}
    assert set(before.values()) == {a.url, b.url}  # both decoders own some domains

    # b leaves while one of its streams is running: the stream finishes, nothing new goes to b.
    on_b = next(t for t, d in before.items() if d == b.url)
    stream = open_stream(router.url, on_b)
    route = json.loads(stream.headers["X-ELDR-Route"])
    assert route["decoder"] == b.url, (route, receipts[on_b])
    r = requests.delete(router.url + "/workers/" + quote(b.url, safe=""), timeout=10)
    assert r.status_code == 200 and r.json()["removed"]["url"] == b.url
    info = workers(router.url)
    assert [w["url"] for w in info["workers"] if w["role"] == "decode"] == [a.url] and info["centroids"] == 1
    assert {generate(router.url, t)["decoder"] for t in prompts} == {a.url}
    body = b"".join(stream.iter_lines())
    assert b'"finish_reason": {"type": "length"' in body and b'"error"' not in body
    wait_for(lambda: all_idle(router.url), 10, "in-flight counts back to zero")

    # The last decoder cannot go; unknown workers are 404; a duplicate add is 409.
    assert requests.delete(router.url + "/workers", params={"url": a.url}, timeout=10).status_code == 409
    assert requests.delete(router.url + "/workers/" + quote("http://127.0.0.1:1", safe=""), timeout=10).status_code == 404
    assert requests.post(router.url + "/workers", json={"url": a.url, "role": "decode"}, timeout=10).status_code == 409
    for bad in ({"url": b.url}, {"url": b.url, "role": "decode", "weight": 2}, {"url": "ftp://x:1", "role": "decode"},
                {"url": b.url, "role": "prefill"}):
        r = requests.post(router.url + "/workers", json=bad, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("POST /workers"), (bad, r.text)

    # b comes back: it gets its own centroid again, so its domains return to it.
    r = requests.post(router.url + "/workers", json={"url": b.url + "/", "role": "decode"}, timeout=10)
    assert r.status_code == 201 and r.json() == {"url": b.url, "role": "decode", "healthy": True, "in_flight": 0, "failures": 0}
    info = workers(router.url)
    assert [w["url"] for w in info["workers"] if w["role"] == "decode"] == [a.url, b.url] and info["centroids"] == 2
    assert {t: generate(router.url, t)["decoder"] for t in prompts} == before
    metrics = requests.get(router.url + "/metrics", timeout=5).text
    assert 'eldr_membership_changes_total{change="removed",role="decode"} 1.0' in metrics
    assert 'eldr_membership_changes_total{change="added",role="decode"} 1.0' in metrics
    assert all_idle(router.url)


def test_prefill_added_unreachable_is_kept_out_until_healthy_then_removed(cluster, centroids):
    router = cluster.start_router(policy="jsq", extra=["--prefill-policy", "rr"])
    ghost = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    r = requests.post(router.url + "/workers", json={"url": ghost, "role": "prefill", "bootstrap_port": free_port("127.0.0.1")},
                      timeout=10)
    assert r.status_code == 201 and r.json()["healthy"] is False
    routes = [generate(router.url, t) for t in by_domain(1)[:3]]
    assert {r["prefill"] for r in routes} == {cluster.prefills[0].url}
    r = requests.delete(router.url + "/workers/" + quote(ghost, safe=""), timeout=10)
    assert r.status_code == 200
    assert requests.delete(router.url + "/workers", params={"url": cluster.prefills[0].url},
                           timeout=10).status_code == 409
    assert [w["url"] for w in workers(router.url)["workers"] if w["role"] == "prefill"] == [cluster.prefills[0].url]
    assert all_idle(router.url)
