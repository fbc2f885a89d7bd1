"""Calibration on the serving router: an eldr router without centroids serves least-loaded, the
calibration runs through it, POST /centroids swaps the fitted file in; no restart, no request cut."""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import msgspec
import numpy as np
import requests

from sglang_eldr import centroids as centroid_file

from .conftest import CALIB, MODEL, rows
from .helpers import LONG, all_idle, decode_rows, wait_for, workers

SHORT = {"temperature": 0, "max_new_tokens": 4}
NO_CENTROIDS = "least-loaded (no centroids)"


def generate(url: str, text: str) -> tuple[int, dict | None]:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": SHORT}, timeout=300)
    return r.status_code, r.json()["meta_info"]["eldr_route"] if r.status_code == 200 else None


def post_centroids(url: str, data: bytes) -> requests.Response:
    return requests.post(url + "/centroids", data=data, headers={"Content-Type": "application/octet-stream"},
                         timeout=30)


def state(url: str) -> tuple[str, object, object]:
    info = workers(url)
    return info["routing"], info["centroids"], info["centroid_file"]


def calibration_subset(path: Path, per_domain: int) -> Path:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows(CALIB):
        by[r["domain"]].append(r)
    path.write_text("".join(json.dumps(r) + "\n" for d in sorted(by) for r in by[d][:per_domain]))
    return path


class Traffic:
    """Requests sent one after another from a thread until stopped; every status and receipt kept."""

    def __init__(self, url: str, texts: list[str]):
        self.url, self.texts = url, texts
        self.results: list[tuple[int, dict | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.results.append(generate(self.url, self.texts[i % len(self.texts)]))
            i += 1

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=300)

    def located(self) -> int:
        return sum(1 for _, route in self.results if route is not None and route["scores"] is not None)


def test_calibration_runs_on_the_serving_router_and_swaps_in_place(cluster, tmp_path):
    kept = cluster.centroids
    texts = [r["text"] for r in rows(CALIB)[::37]]
    try:
        router = cluster.start_router(policy="eldr", with_centroids=False)
        health = requests.get(router.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json() == {"status": "ok", "routing": NO_CENTROIDS}
        assert state(router.url) == (NO_CENTROIDS, None, None)
        # A corrupt file before any centroids: 400, still least-loaded.
        bad = post_centroids(router.url, b"\x93not a centroid file")
        assert bad.status_code == 400 and "not a readable centroid file" in bad.json()["error"]["message"], bad.text
        assert state(router.url)[0] == NO_CENTROIDS

        for status, route in (generate(router.url, t) for t in texts[:3]):
            assert status == 200 and route is not None
            assert route["fallback"] == "no-centroids" and route["scores"] is None and route["band"] is None

        out = tmp_path / "live.eldr"
        with Traffic(router.url, texts) as traffic:
            assert cluster.calibrate(calibration_subset(tmp_path / "calib.jsonl", 4), out=out, max_new_tokens=8) == out
            wait_for(lambda: traffic.located() >= 3, 120, "requests routed by the new centroids")
        assert cluster.router is router and router.proc is not None and router.proc.poll() is None  # no restart
        statuses = [s for s, _ in traffic.results]
        assert statuses and set(statuses) == {200}, statuses
        fallbacks = {route["fallback"] for _, route in traffic.results if route is not None}
        assert "no-centroids" in fallbacks  # the same traffic was served before and after the swap

        routing, count, summary = state(router.url)
        assert (routing, count) == ("locality", 2) and summary["source"] == str(tmp_path / "calib.jsonl")
        assert requests.get(router.url + "/health", timeout=5).json()["routing"] == "locality"
        for status, route in (generate(router.url, t) for t in texts[:4]):
            assert status == 200 and route is not None and route["fallback"] is None
            assert len(route["scores"]) == 2 and route["band"]

        # Bad uploads are refused and routing keeps the centroids it has.
        cs = centroid_file.load(out)
        three = msgspec.structs.replace(cs, centroids=np.vstack([cs.centroids, cs.centroids[:1]]))
        data = out.read_bytes()
        for body, message in ((centroid_file.dumps(three), "3 centroids but 2 decoders"),
                              (data[: len(data) // 2], "not a readable centroid file"),
                              (data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:], "checksum mismatch|corrupt")):
            r = post_centroids(router.url, body)
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert any(m in msg for m in message.split("|")) and "the current centroids stay" in msg, msg
            assert state(router.url) == (routing, count, summary)

        # A swap while a long stream is running: the stream finishes normally.
        stream = requests.post(router.url + "/generate", json={"text": "def fibonacci(n):", "sampling_params": LONG,
                                                              "stream": True}, stream=True, timeout=60)
        assert stream.status_code == 200, stream.text
        lines = stream.iter_lines()
        next(lines)  # decoding has started
        assert post_centroids(router.url, data).status_code == 200
        body = b"".join(lines)
        assert b'"finish_reason": {"type": "length"' in body and b'"error"' not in body

        metrics = requests.get(router.url + "/metrics", timeout=5).text
        # ... plus the calibration's own requests, which were routed least-loaded too
        n = sum(1 for _, route in traffic.results if route is not None and route["fallback"] == "no-centroids") + 3
        counted = re.search(r'^eldr_fallbacks_total\{reason="no-centroids"\} (\S+)$', metrics, re.M)
        assert counted is not None and float(counted.group(1)) >= n, (n, counted)
        assert 'eldr_centroid_updates_total{result="loaded"} 2.0' in metrics
        assert 'eldr_centroid_updates_total{result="refused"} 4.0' in metrics
        wait_for(lambda: all_idle(router.url), 10, "in-flight counts back to zero")
    finally:
        cluster.centroids = kept


def test_centroid_uploads_follow_membership_and_are_refused_by_baselines(cluster):
    shipped = (MODEL / "eldr-centroids-2d.eldr").read_bytes()
    router = cluster.start_router(policy="jsq")
    r = post_centroids(router.url, shipped)
    assert r.status_code == 409 and "routes by load only" in r.json()["error"]["message"], r.text
    assert workers(router.url)["routing"] == "load-only"

    router = cluster.start_router(policy="eldr-static", with_centroids=False)
    b = cluster.decoders[1]
    assert requests.delete(router.url + "/workers/" + quote(b.url, safe=""), timeout=10).status_code == 200
    assert {generate(router.url, "int main(void) {")[1]["decoder"] for _ in range(3)} == {cluster.decoders[0].url}
    r = post_centroids(router.url, shipped)  # fitted for two decoders, one is left
    assert r.status_code == 400 and "2 centroids but 1 decoders" in r.json()["error"]["message"], r.text
    assert requests.post(router.url + "/workers", json={"url": b.url, "role": "decode"}, timeout=10).status_code == 201
    r = post_centroids(router.url, shipped)
    assert r.status_code == 200 and r.json()["routing"] == "locality", r.text
    assert r.json()["centroid_file"]["decoders"] == 2
    status, route = generate(router.url, "int main(void) {")
    assert status == 200 and route["fallback"] is None and len(route["scores"]) == 2
    assert [w["url"] for w in decode_rows(router.url)] == [d.url for d in cluster.decoders]
    wait_for(lambda: all_idle(router.url), 10, "in-flight counts back to zero")
