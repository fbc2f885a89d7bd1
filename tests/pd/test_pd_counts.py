"""Counts a PD prefill server publishes (reduced from SGLang's routed-experts capturer when the
prefill ends) equal a plain server's `return_eldr_counts` and agree with transformers float32,
cold and with a radix-cache prefix hit, chunked prefill included."""

from __future__ import annotations

import random

import numpy as np
import pytest
import zmq

from sglang_eldr.wire import COUNTS_TOPIC, CountsReport, Started, decode_message
from tests.engine.helpers import reference_counts, text_ids
from tests.pd.client import Background, generate_body, get_json, post
from tests.pd.conftest import MAX_NEW_TOKENS, PROMPTS


@pytest.fixture(scope="module")
def counts_sub(pd_pair):
    info = get_json(pd_pair.prefill.url, "/eldr/info")
    assert info["mode"] == "prefill" and info["capture"] is True, info
    endpoint = f"tcp://{info['counts']['host']}:{info['counts']['port']}"
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, COUNTS_TOPIC)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(endpoint)
    yield sock
    sock.close(0)


@pytest.fixture(scope="module")
def hf_model(pd_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(pd_model_dir), dtype=torch.float32)
    m.eval()
    return m


def pd_request(pair, sub, prompt: str):
    """Prefill first, its published report, then the decoder; returns (report, decode body)."""
    room = random.getrandbits(63)
    body = generate_body(prompt, max_new_tokens=MAX_NEW_TOKENS, bootstrap_port=pair.bootstrap_port, room=room)
    pre = Background(post, pair.prefill.url, body)
    started = False
    while True:
        _, msg = decode_message(sub.recv_multipart())  # RCVTIMEO: fails instead of hanging
        started = started or (isinstance(msg, Started) and room in msg.rooms)
        if isinstance(msg, CountsReport) and msg.room == room:
            report = msg
            break
    # The scheduler said it started the request before it reported the counts (the router's
    # counts deadline runs from then).
    assert started
    status, dec = post(pair.decode.url, body)
    assert status == 200, dec
    assert pre.result()[0] == 200
    return report, dec


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"{len(p)}chars")
def test_published_counts_equal_plain_server_and_transformers(pd_pair, counts_sub, hf_model, pd_model_dir, prompt):
    cold, dec = pd_request(pd_pair, counts_sub, prompt)
    assert cold.unavailable is None
    assert dec["output_ids"] == pd_pair.reference[prompt]["output_ids"]
    np.testing.assert_array_equal(cold.array(), pd_pair.reference_counts[prompt])
    hit, _ = pd_request(pd_pair, counts_sub, prompt)  # the prompt's prefix now comes from the radix cache
    np.testing.assert_array_equal(hit.array(), cold.array())
    ids = text_ids(pd_model_dir, prompt)
    assert cold.prompt_tokens == len(ids)
    ref, ties = reference_counts(hf_model, ids)
    moved = np.abs(cold.array().astype(np.int64) - ref).sum(axis=1) // 2
    assert (moved <= ties).all(), f"moved picks {moved} > near ties {ties}"
