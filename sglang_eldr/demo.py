"""`make demo`: a 1P+2D PD cluster of the tiny trained MoE behind the ELDR router.

Starts the servers and the router (calibrating first if no centroid file ships with the model),
sends a mixed-domain batch of held-out prompts, prints per request its domain, the decoder chosen
and the route receipt, then per-decoder totals, and shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sglang_eldr import centroids as centroid_file
from sglang_eldr.launch_cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-qwen3-moe"
SHIPPED_CENTROIDS = MODEL / "eldr-centroids-2d.eldr"
CALIB = ROOT / "bench" / "data" / "prompts_calib.jsonl"
EVAL = ROOT / "bench" / "data" / "prompts_eval.jsonl"


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mixed_batch(n: int, seed: int) -> list[dict]:
    rows = load_rows(EVAL)
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    rng = random.Random(seed)
    domains = sorted(by_domain)
    return [rng.choice(by_domain[domains[i % len(domains)]]) for i in range(n)]


def send(url: str, row: dict, max_new_tokens: int) -> dict:
    r = requests.post(url + "/generate", json={"text": row["text"], "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens}}, timeout=300)
    r.raise_for_status()
    return r.json()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_eldr.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24, help="requests to send (default: 24)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--policy", default="eldr")
    ap.add_argument("--recalibrate", action="store_true", help="calibrate even if a centroid file ships")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", required=True,
                    help="the address the demo cluster's servers and router listen on (make demo: 127.0.0.1)")
    args = ap.parse_args(argv)
    if not (MODEL / "config.json").exists():
        print(f"demo: the tiny model is missing at {MODEL}", file=sys.stderr)
        return 2

    t0 = time.monotonic()
    with Cluster(model_path=str(MODEL), num_prefill=1, num_decode=2, policy=args.policy, host=args.host) as cluster:
        print(f"[{time.monotonic() - t0:5.1f}s] 1 prefill + 2 decode servers healthy "
              f"({', '.join(s.url for s in cluster.servers)}); logs in {cluster.log_dir}")
        if SHIPPED_CENTROIDS.exists() and not args.recalibrate:
            cluster.centroids = str(SHIPPED_CENTROIDS)
            print(f"[{time.monotonic() - t0:5.1f}s] using shipped centroids {SHIPPED_CENTROIDS.relative_to(ROOT)}")
            router = cluster.start_router()
        else:
            router = cluster.start_router(with_centroids=False)
            print(f"[{time.monotonic() - t0:5.1f}s] calibrating on {CALIB.relative_to(ROOT)} through the router "
                  "(least-loaded until the centroids are loaded into it) ...")
            cluster.calibrate(CALIB)
        assert cluster.centroids is not None
        cs = centroid_file.load(cluster.centroids)
        print(f"[{time.monotonic() - t0:5.1f}s] ELDR router ({args.policy}, tau {cluster.tau}) on {router.url}; "
              f"centroids fitted on {cs.fit.num_requests} prompts, layers kept {cs.layer_mask.astype(int).tolist()}")

        batch = mixed_batch(args.requests, args.seed)
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda row: send(router.url, row, args.max_new_tokens), batch))
        decoders = [d.url for d in cluster.decoders]
        table: Counter[tuple[str, str]] = Counter()
        print(f"\n{'#':>3} {'domain':>9}  decoder  {'scores':>13}  band    loads   fallback  output")
        for i, (row, res) in enumerate(zip(batch, results)):
            route = res["meta_info"]["eldr_route"]
            d = decoders.index(route["decoder"])
            table[(row["domain"], route["decoder"])] += 1
            scores = " ".join(f"{s:.2f}" for s in route.get("scores") or [])
            text = res["text"].replace("\n", "\\n")[:40]
            print(f"{i:>3} {row['domain']:>9}  D{d}       {scores:>13}  {str(route.get('band')):7} "
                  f"{str(route['loads']):7} {str(route.get('fallback') or '-'):9} {text!r}")
        print("\nper-decoder totals (requests by domain):")
        domains = sorted({r["domain"] for r in batch})
        print(f"{'':>9} " + " ".join(f"{d:>9}" for d in domains))
        for i, url in enumerate(decoders):
            print(f"{'D' + str(i):>9} " + " ".join(f"{table[(d, url)]:>9}" for d in domains))
        workers = requests.get(router.url + "/workers", timeout=5).json()["workers"]
        in_flight = [w["in_flight"] for w in workers if w["role"] == "decode"]
        print(f"\nin flight after the batch: {in_flight}; total time {time.monotonic() - t0:.1f}s; shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
