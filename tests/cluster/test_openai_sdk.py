"""The OpenAI SDK against the router of the real cluster: one choice per request works, n > 1 is
refused with a 400 before any server work (never a 500), and nothing is left in flight."""

from __future__ import annotations

import openai
import pytest
import requests

from .helpers import all_idle, wait_for


def test_n_above_one_is_a_bad_request_and_n_one_works(cluster, centroids):
    router = cluster.start_router(policy="eldr", centroids=centroids)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write a C function that adds two ints."}]

    with pytest.raises(openai.BadRequestError, match="'n' = 2"):
        client.completions.create(model=model, prompt="def add(a, b):", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="'best_of' = 3"):
        client.completions.create(model=model, prompt="def add(a, b):", max_tokens=4, best_of=3)
    with pytest.raises(openai.BadRequestError, match="'n' = 3"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=4, n=3)  # type: ignore[arg-type]
    r = requests.post(router.url + "/generate", json={"text": "def add(a, b):",
                                                      "sampling_params": {"max_new_tokens": 4, "n": 2}}, timeout=30)
    assert r.status_code == 400 and "'sampling_params.n' = 2" in r.json()["error"]["message"], r.text
    assert all(w["in_flight"] == 0 for w in requests.get(router.url + "/workers", timeout=5).json()["workers"])

    done = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=4, n=1, temperature=0)
    assert len(done.choices) == 1 and done.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert len(chat.choices) == 1 and chat.choices[0].message.content
    metrics = requests.get(router.url + "/metrics", timeout=5).text
    assert 'eldr_requests_total{endpoint="/v1/completions",status="400"} 2.0' in metrics
    assert 'eldr_requests_total{endpoint="/v1/completions",status="200"} 1.0' in metrics
    wait_for(lambda: all_idle(router.url), 10, "in-flight counts back to zero")
