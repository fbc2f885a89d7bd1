"""Outputs unchanged by the plugin, stock behaviour kept, and bad input answered cleanly."""

from __future__ import annotations

import pytest

from tests.engine.helpers import token_ids

pytestmark = pytest.mark.needs_engine

PROMPTS = [token_ids(n, 500 + n) for n in (5, 33, 120, 260)]


def _greedy(server, counts):
    out = []
    for p in PROMPTS:
        server.flush_cache()
        r = server.generate(p, max_new_tokens=24, counts=counts)
        out.append(r["output_ids"])
    return out


def test_greedy_tokens_identical_to_stock(eldr_server, stock_server):
    eldr = _greedy(eldr_server, True)
    stock = _greedy(stock_server, None)
    diff = [(len(p), e, s) for p, e, s in zip(PROMPTS, eldr, stock) if e != s]
    assert not diff, f"greedy outputs differ (prompt length, eldr, stock): {diff}"


def test_stock_server_ignores_field(stock_server):
    """With the package installed, stock sglang.launch_server stays stock: the plugin is inactive."""
    r = stock_server.generate(token_ids(10, 1), counts=True)
    assert "eldr_counts" not in r["meta_info"]
    assert "ELDR" not in stock_server.log_text()


@pytest.mark.parametrize("bad", ["yes", 1, [True], {"a": 1}])
def test_non_boolean_flag_is_400(eldr_server, bad):
    status, body = eldr_server.post("/generate", {
        "input_ids": token_ids(5, 2), "return_eldr_counts": bad,
        "sampling_params": {"max_new_tokens": 1}})
    assert status == 400, body
    assert "return_eldr_counts" in str(body)
    assert eldr_server.generate(token_ids(5, 2))["meta_info"]["eldr_counts"]  # still serving


def test_stream_carries_counts_once(eldr_server):
    import json
    import urllib.request

    payload = {"input_ids": token_ids(30, 9), "return_eldr_counts": True, "stream": True,
               "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(eldr_server.url + "/generate", data=json.dumps(payload).encode(),
                                 headers={"content-type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
    with_counts = [c for c in chunks if "eldr_counts" in c["meta_info"]]
    assert len(with_counts) >= 1
    assert with_counts[0]["meta_info"]["eldr_counts_shape"] == [4, 64]


def test_dense_model_is_400(dense_server):
    status, body = dense_server.post("/generate", {
        "input_ids": token_ids(5, 3), "return_eldr_counts": True, "sampling_params": {"max_new_tokens": 2}})
    assert status == 400, body
    assert "not a mixture-of-experts" in str(body)
    r = dense_server.generate(token_ids(5, 3), counts=None, max_new_tokens=2)  # still serving
    assert len(r["output_ids"]) == 2


def test_capture_off_is_400(capture_off_server):
    status, body = capture_off_server.post("/generate", {
        "input_ids": token_ids(5, 4), "return_eldr_counts": True, "sampling_params": {"max_new_tokens": 2}})
    assert status == 400, body
    assert "capture is off" in str(body)
    r = capture_off_server.generate(token_ids(5, 4), counts=False, max_new_tokens=2)
    assert "eldr_counts" not in r["meta_info"]
