"""`make demo`: expert-locality routing on a 1P+4D PD cluster of the tiny trained MoE, side by side
with a load-only router.

Starts one prefill and four decode servers, then sends the same mixed batch of held-out prompts
(six kinds of text: Python, C headers, JSON, Markdown, man pages, arithmetic) through the router
once per policy: marginal (the default: the decoder where the request adds the fewest expected
expert reads), eldr (the paper's rule: the least-loaded decoder among those whose centroid is near
the request's prefill signature) and jsq (join the shortest queue, what a load-only router does).
For each run it prints where each kind of text was decoded, and what that buys: the distinct
experts per MoE layer a decoder's decode step reads. A MoE decode step must read the weights of
every expert its batch activates, so fewer distinct experts per step is less weight traffic for the
same tokens, which is where a GPU decoder's time per output token goes. Batch sizes differ a little
between runs, so the comparison is made at equal batch size (each size weighted by how often the
runs saw it). The outputs of every run are compared token for token: routing moves requests, it
never changes them.
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

from sglang_eldr.decode_policy import DECODE_POLICIES, DEFAULT_DECODE_POLICY
from sglang_eldr.launch_cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-qwen3-moe"
CALIB = ROOT / "bench" / "data" / "prompts_calib.jsonl"
EVAL = ROOT / "bench" / "data" / "prompts_eval.jsonl"


def shipped_centroids(decoders: int) -> Path:
    return MODEL / f"eldr-centroids-{decoders}d.eldr"


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mixed_batch(n: int, seed: int) -> list[dict]:
    """`n` held-out prompts, the domains interleaved (so every decoder sees every kind arrive)."""
    by_domain: dict[str, list[dict]] = {}
    for r in load_rows(EVAL):
        by_domain.setdefault(r["domain"], []).append(r)
    rng = random.Random(seed)
    domains = sorted(by_domain)
    return [rng.choice(by_domain[domains[i % len(domains)]]) for i in range(n)]


def send(url: str, row: dict, max_new_tokens: int) -> dict:
    r = requests.post(url + "/generate", json={"text": row["text"], "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}, timeout=300)
    r.raise_for_status()
    return r.json()


def run_policy(cluster: Cluster, policy: str, batch: list[dict], args: argparse.Namespace) -> dict:
    router = cluster.start_router(policy=policy)
    marks = cluster.step_marks()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda row: send(router.url, row, args.max_new_tokens), batch))
    time.sleep(0.3)  # a decoder writes its last step's line just after the response
    steps = cluster.steps_since(marks)
    in_flight = [w["in_flight"] for w in requests.get(router.url + "/workers", timeout=5).json()["workers"]
                 if w["role"] == "decode"]
    return {"policy": policy, "results": results, "steps": steps, "in_flight": in_flight}


def experts_by_batch(run: dict, layers: int) -> dict[int, list[float]]:
    """Distinct experts per MoE layer of every decode step, by batch size."""
    out: dict[int, list[float]] = {}
    for steps in run["steps"]:
        for s in steps:
            out.setdefault(s["tokens"], []).append(s["distinct_pairs"] / layers)
    return out


def at_equal_batch(runs: list[dict], layers: int) -> tuple[list[float], dict[int, int]]:
    """Each run's mean distinct experts per layer per step over batch sizes ≥ 2 that every run saw,
    each size weighted by the steps all runs had at it."""
    by = [experts_by_batch(r, layers) for r in runs]
    sizes = sorted(b for b in set.intersection(*(set(x) for x in by)) if b >= 2)
    weight = {b: sum(len(x[b]) for x in by) for b in sizes}
    total = sum(weight.values())
    means = [sum(weight[b] * sum(x[b]) / len(x[b]) for b in sizes) / total if total else float("nan") for x in by]
    return means, weight


def print_run(run: dict, batch: list[dict], decoders: list[str]) -> dict:
    table: Counter[tuple[str, int]] = Counter()
    fallbacks: Counter[str] = Counter()
    for row, res in zip(batch, run["results"]):
        route = res["meta_info"]["eldr_route"]
        table[(row["domain"], decoders.index(route["decoder"]))] += 1
        fallbacks[route.get("fallback") or "none"] += 1
    domains = sorted({r["domain"] for r in batch})
    print(f"\n{run['policy']}: requests decoded per decoder, by kind of text")
    print(f"{'':>10} " + " ".join(f"{'D' + str(i):>4}" for i in range(len(decoders))) + "   on its main decoder")
    shares = []
    for d in domains:
        placed = [table[(d, i)] for i in range(len(decoders))]
        shares.append(max(placed) / max(sum(placed), 1))
        print(f"{d:>10} " + " ".join(f"{n:>4}" for n in placed) + f"   {shares[-1]:5.0%}")
    steps = [s for per in run["steps"] for s in per]
    share = sum(shares) / len(shares)
    print(f"{'':>10} mean share on the main decoder {share:.0%}; fallbacks {dict(fallbacks)}; "
          f"in flight after the run {run['in_flight']}")
    return {"batch": sum(s["tokens"] for s in steps) / max(len(steps), 1), "share": share}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_eldr.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per run (default: 48)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens each request decodes (default: 48)")
    ap.add_argument("--decoders", type=int, default=4,
                    help="decode servers (default: 4; with 2 every locality band holds both, so the "
                         "eldr policy cannot separate anything)")
    ap.add_argument("--policies", nargs="+", choices=[p for p in DECODE_POLICIES if p != "jsq"],
                    default=list(dict.fromkeys([DEFAULT_DECODE_POLICY, "eldr"])),
                    help=f"the policies shown against jsq (default: {DEFAULT_DECODE_POLICY} eldr)")
    ap.add_argument("--recalibrate", action="store_true", help="eldr: calibrate even if a centroid file ships")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", required=True,
                    help="the address the demo cluster's servers and router listen on (make demo: 127.0.0.1)")
    args = ap.parse_args(argv)
    if not (MODEL / "config.json").exists():
        print(f"demo: the tiny model is missing at {MODEL}", file=sys.stderr)
        return 2
    layers = json.loads((MODEL / "config.json").read_text())["num_hidden_layers"]

    t0 = time.monotonic()
    policies = [*dict.fromkeys(args.policies), "jsq"]
    with Cluster(model_path=str(MODEL), num_prefill=1, num_decode=args.decoders, policy=policies[0],
                 host=args.host, step_stats=True) as cluster:
        print(f"[{time.monotonic() - t0:5.1f}s] 1 prefill + {args.decoders} decode servers healthy "
              f"({', '.join(s.url for s in cluster.servers)}); logs in {cluster.log_dir}")
        if any(p.startswith("eldr") for p in policies):
            shipped = shipped_centroids(args.decoders)
            if shipped.exists() and not args.recalibrate:
                cluster.centroids = str(shipped)
                print(f"[{time.monotonic() - t0:5.1f}s] eldr: centroids {shipped.relative_to(ROOT)}")
            else:
                print(f"[{time.monotonic() - t0:5.1f}s] eldr: calibrating {args.decoders} centroids on "
                      f"{CALIB.relative_to(ROOT)} through the router ...")
                cluster.calibrate(CALIB)
        batch = mixed_batch(args.requests, args.seed)
        print(f"[{time.monotonic() - t0:5.1f}s] {len(batch)} prompts, {args.concurrency} in flight, "
              f"{args.max_new_tokens} tokens each, through {', '.join(policies)} ...")
        runs = [run_policy(cluster, p, batch, args) for p in policies]
        decoders = [d.url for d in cluster.decoders]
        for r in runs:
            print(f"\na route receipt ({r['policy']}): {json.dumps(r['results'][0]['meta_info']['eldr_route'])}")
        summary = [print_run(r, batch, decoders) for r in runs]
        means, weight = at_equal_batch(runs, layers)
        base = means[-1]
        print(f"\ndistinct experts per MoE layer per decode step, at equal batch size "
              f"(sizes {', '.join(f'{b}: {n} steps' for b, n in weight.items())}):")
        for r, m, sm in zip(runs, means, summary):
            same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(r["results"], runs[-1]["results"]))
            vs = "" if r is runs[-1] else f"  {(m / base - 1) * 100:+.0f} % vs jsq; outputs identical to jsq's {same}/{len(batch)}"
            print(f"  {r['policy']:>8}: {m:5.2f}  (mean batch {sm['batch']:.1f}; "
                  f"{sm['share']:.0%} of a kind on its main decoder){vs}")
        print(f"\ntotal time {time.monotonic() - t0:.1f}s; shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
