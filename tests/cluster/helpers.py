"""Helpers shared by the cluster tests: the router's view of its workers, SGLang's own load, waiting."""

from __future__ import annotations

import time

import requests

LONG = {"temperature": 0, "max_new_tokens": 300, "ignore_eos": True}  # prompt + 300 < 512 (context)


def workers(url: str) -> dict:
    return requests.get(url + "/workers", timeout=5).json()


def decode_rows(url: str) -> list[dict]:
    return [w for w in workers(url)["workers"] if w["role"] == "decode"]


def wait_for(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def all_idle(url: str) -> bool:
    return all(w["in_flight"] == 0 for w in workers(url)["workers"])


def server_busy(server_url: str) -> int:
    """Requests an SGLang server holds (running + queued, all disaggregation queues)."""
    loads = requests.get(server_url + "/v1/loads", timeout=5).json()["loads"]
    return sum(int(l.get("num_running_reqs", 0)) + int(l.get("num_waiting_reqs", 0))
               + sum(int(v) for k, v in (l.get("disaggregation") or {}).items()
                     if k.endswith("_queue_reqs") and isinstance(v, (int, float)))
               for l in loads)


def open_stream(url: str, text: str) -> requests.Response:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": LONG, "stream": True},
                      stream=True, timeout=60)
    assert r.status_code == 200, r.text
    return r
