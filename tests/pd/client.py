"""HTTP helpers for the PD tests (stdlib only)."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from tests.engine.servers import post_json


def generate_body(prompt: str, *, max_new_tokens: int, bootstrap_port: Optional[int] = None,
                  room: Optional[int] = None, stream: bool = False) -> dict:
    body: dict[str, Any] = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
        "return_logprob": True,
    }
    if bootstrap_port is not None:
        body.update(bootstrap_host="127.0.0.1", bootstrap_port=bootstrap_port,
                    bootstrap_room=random.getrandbits(63) if room is None else room)
    if stream:
        body["stream"] = True
    return body


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, Any]:
    return post_json(url + "/generate", body, timeout)


def post_stream(url: str, body: dict, timeout: float = 300) -> tuple[int, list[str]]:
    """POST and return the raw `data:` payloads of the server-sent events, in order."""
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data:"):
                events.append(line[len("data:"):].strip())
        return r.status, events


def get_json(url: str, path: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url + path, timeout=timeout) as r:
        return json.loads(r.read())


def prefill_load(url: str) -> dict:
    """The prefill server's load snapshot: tokens in use and its PD queues (published at once on prefill)."""
    load = get_json(url, "/v1/loads")["loads"][0]
    return {"used_tokens": load["num_used_tokens"], **load["disaggregation"]}


class Background:
    """Run a blocking call in a thread; `.result()` joins and returns (or raises) its outcome."""

    def __init__(self, fn, *args, **kwargs):
        self._out: dict = {}
        self.started = time.monotonic()

        def run():
            try:
                self._out["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._out["error"] = e
            self._out["done_at"] = time.monotonic()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 300):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background call still running")
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]

    @property
    def elapsed(self) -> float:
        return self._out.get("done_at", time.monotonic()) - self.started
