"""Soak: many requests through a 1P+2D ELDR cluster while a decoder is killed (SIGKILL) and
restarted, twice. Reports requests sent, answered OK, answered with an error, unanswered (must be
0), and the router's in-flight counters at the end (must all be 0).

    python bench/soak.py            # >= 2000 requests
    python bench/soak.py --quick    # 60 requests, one kill/restart (CI-sized)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sglang_eldr.launch_cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-qwen3-moe"
EVAL = ROOT / "bench" / "data" / "prompts_eval.jsonl"


def one(url: str, row: dict, stream: bool, max_new_tokens: int) -> str:
    body = {"text": row["text"], "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
            "stream": stream}
    try:
        r = requests.post(url + "/generate", json=body, timeout=180, stream=stream)
    except requests.RequestException as e:
        return f"unanswered:{type(e).__name__}"
    if r.status_code != 200:
        return f"error:{r.status_code}"
    if not stream:
        return "ok" if "eldr_route" in r.json().get("meta_info", {}) else "error:no-receipt"
    last = None
    try:
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                last = json.loads(line[5:])
    except requests.RequestException as e:
        return f"unanswered:{type(e).__name__}"
    if last is None:
        return "unanswered:empty-stream"
    return "error:stream" if "error" in last else "ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--rate", type=float, default=8.0, help="max request starts per second")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    ap.add_argument("--host", default="127.0.0.1",
                    help="the address the benchmark cluster listens on (default: 127.0.0.1, this machine only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.kills = 60, 1
    rows = [json.loads(l) for l in EVAL.read_text().splitlines() if l.strip()]
    rng = random.Random(0)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    with Cluster(model_path=str(MODEL), num_prefill=1, num_decode=2, host=args.host,
                 centroids=str(MODEL / "eldr-centroids-2d.eldr")) as cluster:
        router = cluster.start_router(extra=["--health-interval", "1", "--health-failures", "2"])
        victim = cluster.decoders[1]
        kill_at = [int(args.requests * (i + 1) / (args.kills + 1)) for i in range(args.kills)]
        events: list[str] = []

        def chaos(n: int) -> None:
            t = time.monotonic() - started
            cluster.kill(victim)
            events.append(f"{t:.0f}s: killed decoder {victim.url} after {n} requests")
            time.sleep(3)
            cluster.restart(victim)
            events.append(f"{time.monotonic() - started:.0f}s: decoder {victim.url} back")

        backlog = threading.BoundedSemaphore(args.concurrency * 3)  # in flight + queued

        def task(i: int, row: dict) -> None:
            try:
                res = one(router.url, row, stream=i % 2 == 1, max_new_tokens=args.max_new_tokens)
                with lock:
                    outcomes[res] += 1
            finally:
                backlog.release()

        chaos_threads = []
        with ThreadPoolExecutor(args.concurrency) as pool:
            for i in range(args.requests):
                if i in kill_at:
                    th = threading.Thread(target=chaos, args=(i,))
                    th.start()
                    chaos_threads.append(th)
                backlog.acquire()
                pool.submit(task, i, rng.choice(rows))
                time.sleep(1 / args.rate)
        for th in chaos_threads:
            th.join()
        time.sleep(1)
        workers = requests.get(router.url + "/workers", timeout=10).json()["workers"]
        in_flight = {f'{w["role"]} {w["url"]}': w["in_flight"] for w in workers}
        metrics = requests.get(router.url + "/metrics", timeout=10).text
    ok = outcomes["ok"]
    errors = sum(v for k, v in outcomes.items() if k.startswith("error"))
    unanswered = sum(v for k, v in outcomes.items() if k.startswith("unanswered"))
    fallbacks = [l for l in metrics.splitlines() if l.startswith("eldr_fallbacks_total")]
    report = {"sent": args.requests, "ok": ok, "errors": errors, "unanswered": unanswered,
              "outcomes": dict(outcomes), "in_flight_at_end": in_flight, "events": events,
              "fallbacks": fallbacks, "seconds": round(time.monotonic() - started)}
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"soak: {args.requests} sent, {ok} ok, {errors} answered with an error, {unanswered} unanswered; "
          f"in flight at the end: {in_flight}; {report['seconds']} s", file=sys.stderr)
    good = unanswered == 0 and all(v == 0 for v in in_flight.values()) and ok + errors == args.requests
    print("PASS" if good else "FAIL", file=sys.stderr)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
