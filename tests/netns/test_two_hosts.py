"""PD serving across two network namespaces: counts, KV and requests cross a veth pair."""

from __future__ import annotations

import requests

from tests.cluster.conftest import EVAL, rows
from tests.cluster.helpers import all_idle

from .conftest import HOST_A, in_netns


def test_router_in_another_namespace_routes_with_real_counts(netns_cluster):
    cluster, plain, ns_b = netns_cluster
    model = cluster.model_path

    def body():
        router = cluster.start_router(policy="eldr-static", centroids=f"{model}/eldr-centroids-2d.eldr")
        prefill = cluster.prefills[0]
        assert prefill.host == HOST_A and router.host != HOST_A
        routes = []
        for row in rows(EVAL)[:4]:
            payload = {"text": row["text"], "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
            got = requests.post(router.url + "/generate", json=payload, timeout=120).json()
            ref = requests.post(plain.url + "/generate", json=payload, timeout=120).json()
            assert got["output_ids"] == ref["output_ids"], row["domain"]
            routes.append(got["meta_info"]["eldr_route"])
        assert all(r["fallback"] is None and r["scores"] is not None for r in routes), routes
        assert all_idle(router.url)
        info = requests.get(prefill.url + "/eldr/info", timeout=5).json()
        return info

    info = in_netns(ns_b, body)
    assert info["counts"]["host"] == HOST_A
