"""Time to first token side by side with stock SGLang PD routing (issue 12).

Two clusters of the tiny trained MoE run at once (one core each server; only the arm being measured
gets traffic), and SGLang's own client (`python -m sglang.benchmark.serving --backend sglang`,
streaming /generate, the held-out prompts) measures four routes in shuffled order per repeat:

* `stock-smg`: the stock baseline. Servers without ELDR capture (`--no-eldr-capture`: the plugin
  only applies its CPU guards, which stock SGLang PD needs on CPU, docs/smg-baseline.md §7) and
  SGLang's default decode allocation policy (`early`), behind smg 1.13.0 (SGLang Model Gateway) in
  PD mode with round_robin: it sends each request to a prefill and a decoder at once.
* `eldr-servers-smg`: this project's servers (capture on, `prefill_complete`) behind the same smg.
* `stock-smg-b` (interleaved runs only): an A/A control, the second cluster started with the stock
  servers too; its ratio to `stock-smg` is the bias between two identical clusters on these cores.
* `eldr-router-eldr`, `eldr-router-jsq`: those servers behind this router, deciding after prefill
  (`--no-early-first-token`: the client's first token comes from the decoder, as in stock PD).
  Interleaved, the two together are a crossover: this project's servers on both clusters, each
  policy behind its own router, the clusters swapped every run; their ratio is eldr's placement
  against jsq's with the servers and the path held equal.
* `eldr-router-eldr-early`: the same with the early first token (the prefill's own first chunk is
  forwarded without waiting for the handoff to the decoder). The router does this for the OpenAI endpoints only, so
  it is measured with `--backend sglang-oai-chat` (streaming /v1/chat/completions; smg refuses the
  completions client's `best_of: 1` with `stream`), and all routes of that run use that backend.

Before each arm the radix caches of its cluster are flushed, so no arm reuses another's prefixes.
Reports TTFT/TPOT p50/p99 and output throughput per run, and per route the paired ratio to
`stock-smg` (same repeat, same rate) with a 95 % t-interval over repeats. Writes the runs as a list
of records to bench/results/ttft_vs_stock.json, the ratios to ttft_vs_stock_summary.json and a plot.

`--interleave N` adds N interleaved runs on the same clusters (bench/interleaved.py): the
`--interleave-routes` all up at once, each prompt sent once to every route as consecutive arrivals
in a random order, timed by SGLang's own request function. The machine's drift between runs, which
swamps the shuffled runs' ratios, then falls on every route alike. Rate 0 sends one request at a time:
each route's bare serial path. Written to ttft_vs_stock_interleaved.json (or --interleave-out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_policies import custom_dataset, run_bench  # noqa: E402
from interleaved import load_prompts, paired_ratios, run_interleaved, run_summary  # noqa: E402
from interleaved import plot as plot_interleaved  # noqa: E402
from intervals import repeat_ratios, t_interval  # noqa: E402

from sglang_eldr.launch_cluster import Cluster, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-qwen3-moe"
EVAL = ROOT / "bench" / "data" / "prompts_eval.jsonl"
SMG = ROOT / ".venv" / "smg" / "bin" / "smg"
ROUTES = ["stock-smg", "eldr-servers-smg", "eldr-router-eldr", "eldr-router-jsq", "eldr-router-eldr-early"]
DEFAULT_ROUTES = ROUTES[:4]
# `stock-smg-b`: stock servers on the second cluster too, behind its own smg (interleaved runs only):
# an A/A control whose ratio to stock-smg is the bias between the two clusters' processes.
INTERLEAVE_ROUTES = ROUTES[:4] + ["stock-smg-b"]
# Interleaved runs of these two: a crossover of eldr's placement against jsq's on the same servers and
# path, each router on its own cluster of this project's servers, the clusters swapped every run.
CROSSOVER = ("eldr-router-eldr", "eldr-router-jsq")
METRICS = {"ttft_p50_ms": "median_ttft_ms", "ttft_p99_ms": "p99_ttft_ms", "tpot_p50_ms": "median_tpot_ms",
           "tpot_p99_ms": "p99_tpot_ms", "output_tok_s": "output_throughput", "e2e_p50_ms": "median_e2e_latency_ms",
           "e2e_p99_ms": "p99_e2e_latency_ms", "itl_p50_ms": "median_itl_ms"}
# smg flags: a plain round-robin PD proxy (no load polling, no overload veto, no retries), so the
# comparison is of the protocol, not of smg's admission features.
SMG_FLAGS = ["--policy", "round_robin", "--disable-tokenizer-autoload", "--disable-load-monitoring",
             "--disable-worker-overload-protection", "--disable-retries", "--log-level", "warn"]


class Smg:
    """One smg process in PD mode in front of a cluster; stopped by PID."""

    def __init__(self, cluster: Cluster, host: str, log: Path):
        if not SMG.exists():
            raise SystemExit(f"smg is not installed at {SMG}: run `make build` (it installs smg==1.13.0)")
        self.port, prom = free_port(host), free_port(host)
        self.url = f"http://{host}:{self.port}"
        cmd = [str(SMG), "launch", "--host", host, "--port", str(self.port), "--prometheus-host", host,
               "--prometheus-port", str(prom), "--pd-disaggregation"]
        for p in cluster.prefills:
            cmd += ["--prefill", p.url, str(p.bootstrap_port)]  # smg does not discover the bootstrap port
        for d in cluster.decoders:
            cmd += ["--decode", d.url]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd + SMG_FLAGS, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        want = (len(cluster.prefills), len(cluster.decoders))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited ({self.proc.returncode}); see {log}")
            try:
                if requests.get(self.url + "/readiness", timeout=2).status_code == 200:
                    stats = requests.get(self.url + "/workers", timeout=2).json().get("stats", {})
                    if (stats.get("prefill_count"), stats.get("decode_count")) == want:
                        return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"smg not ready with {want} prefill/decode workers in 60 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def flush(cluster: Cluster) -> None:
    for s in cluster.servers:
        s.flush_cache()


def labelled_counter(url: str, name: str, label: str) -> dict[str, float]:
    """One of the router's counters by label value (eldr_fallbacks_total by reason, eldr_first_token_total
    by source)."""
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            out[line.split(f'{label}="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


# Each route against stock PD, and this router's routes against smg on the very same servers (which
# isolates what deciding after prefill costs from the servers' settings).
# The early first token is also compared with the same router without it.
PAIRS = [(route, "stock-smg") for route in ROUTES[1:]] + [
    (route, "eldr-servers-smg") for route in ROUTES if route.startswith("eldr-router-")] + [
    ("eldr-router-eldr-early", "eldr-router-eldr")]


def backend_of(record: dict) -> str:
    return record.get("backend", "sglang")  # records written before the backend was recorded


def groups(records: list[dict]) -> list[tuple[str, float]]:
    return sorted({(backend_of(r), r["rate"]) for r in records})


def summarize(records: list[dict]) -> list[dict]:
    """Per (client backend, rate, route, baseline, metric): the paired ratio route / baseline over repeats."""
    out = []
    for backend, rate in groups(records):
        same = [r for r in records if backend_of(r) == backend and r["rate"] == rate]
        for route, vs in PAIRS:
            for metric in METRICS:
                ratios = repeat_ratios(same, route, vs, metric)
                if not ratios:
                    continue
                m, lo, hi = t_interval(ratios)
                out.append({"backend": backend, "rate": rate, "route": route, "metric": metric, "vs": vs, "n": len(ratios),
                            "ratio_mean": m, "ci95_low": lo, "ci95_high": hi})
    return out


def verdict(s: dict) -> str:
    if math.isnan(s["ci95_low"]):
        return "one repeat: no interval"
    if s["ci95_low"] > 1:
        return "higher (outside the noise)"
    if s["ci95_high"] < 1:
        return "lower (outside the noise)"
    return "unresolved (inside the noise)"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = groups(records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, label in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        width = 0.8 / len(ROUTES)
        for i, route in enumerate(ROUTES):
            for j, (backend, rate) in enumerate(cells):
                rs = [r for r in records if r["route"] == route and r["rate"] == rate and backend_of(r) == backend]
                if not rs:
                    continue
                p50 = [r[f"{metric}_p50_ms"] for r in rs]
                p99 = [r[f"{metric}_p99_ms"] for r in rs]
                x = j + i * width
                ax.bar(x, np.mean(p50), width, color=f"C{i}", label=route if j == 0 else None)
                ax.scatter([x] * len(p99), p99, color="k", marker="_", s=60, zorder=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], [f"{r:g} req/s\n{b}" for b, r in cells])
        ax.set_ylabel(f"{label} ms (bar: mean p50; ticks: p99 per repeat)")
        ax.set_title(f"{label}, tiny MoE 1P+{records[0]['decoders']}D on CPU")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="the address every server and router binds (default: 127.0.0.1)")
    ap.add_argument("--decoders", type=int, default=2, help="decode servers per cluster (default: 2)")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0], help="request rates, req/s (default: 2 4)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=DEFAULT_ROUTES,
                    help=f"routes to measure (default: {' '.join(DEFAULT_ROUTES)})")
    ap.add_argument("--backend", choices=("sglang", "sglang-oai-chat"), default="sglang",
                    help="the client's backend: streaming /generate (sglang) or /v1/chat/completions (sglang-oai-chat; "
                         "needed for eldr-router-eldr-early) (default: sglang)")
    ap.add_argument("--interleave", type=int, default=0, metavar="REPEATS",
                    help="after the shuffled runs, this many interleaved runs (bench/interleaved.py): the "
                         "--interleave-routes at once on the same prompts, each prompt once per route in a random "
                         "order, so the machine's drift cancels in the paired ratio (default: 0; --repeats 0 runs "
                         "only these)")
    ap.add_argument("--interleave-routes", nargs="+", choices=INTERLEAVE_ROUTES, default=["stock-smg", "eldr-router-eldr"],
                    help="routes of the interleaved runs, at most one eldr-router-* (default: stock-smg eldr-router-eldr); "
                         "stock-smg stock-smg-b runs an A/A pair: the second cluster with the stock servers too "
                         "(with --repeats 0 only); eldr-router-eldr eldr-router-jsq runs a crossover: this project's "
                         "servers on both clusters, each policy behind its own router, the clusters swapped every "
                         "run (with --repeats 0 only)")
    ap.add_argument("--interleave-rates", type=float, nargs="+", default=[1.0],
                    help="Poisson rate per route of the interleaved runs, req/s; 0 means one request at a time, "
                         "each route's bare path with nothing queued (default: 1)")
    ap.add_argument("--interleave-groups", type=int, default=128, help="prompts per interleaved run (default: 128)")
    ap.add_argument("--interleave-out", type=Path, default=None,
                    help="where the interleaved runs go (default: --out's name with _interleaved)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: 1P+1D clusters, one rate, 8 prompts, one repeat, every route, sglang-oai-chat; "
                         "then one interleaved run of 6 prompts")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ttft_vs_stock.json")
    ap.add_argument("--merge-with", type=Path, default=None,
                    help="records of an earlier run (same settings, another --seed) to pool with this one's: its "
                         "repeats keep their numbers and this run's follow them")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: recompute the summary and plot from the records already in --out")
    args = ap.parse_args(argv)
    if args.report_only:
        report(json.loads(args.out.read_text()), args, {}, [], None)
        return 0
    # SIGTERM ends the run like Ctrl-C: the `finally` below stops smg and the clusters.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    earlier = json.loads(args.merge_with.read_text()) if args.merge_with else []
    first_repeat = 1 + max((r["repeat"] for r in earlier), default=-1)
    if args.quick:
        args.decoders, args.rates, args.num_prompts, args.output_len, args.repeats = 1, [2.0], 8, 8, 1
        args.routes, args.backend = list(ROUTES), "sglang-oai-chat"
        args.interleave, args.interleave_groups, args.interleave_rates = 1, 6, [1.0]
    crossover = set(args.interleave_routes) == set(CROSSOVER)
    if crossover and args.repeats:
        ap.error("eldr-router-eldr with eldr-router-jsq is a crossover of two clusters: use it with --repeats 0")
    if not crossover and sum(r.startswith("eldr-router-") for r in args.interleave_routes) > 1:
        ap.error("--interleave-routes takes at most one eldr-router-* route, or exactly eldr-router-eldr "
                 "eldr-router-jsq (the crossover)")
    aa = "stock-smg-b" in args.interleave_routes
    if aa and (args.repeats or set(args.interleave_routes) != {"stock-smg", "stock-smg-b"}):
        ap.error("stock-smg-b is an A/A control: --interleave-routes stock-smg stock-smg-b with --repeats 0")
    if "eldr-router-eldr-early" in args.routes and args.backend != "sglang-oai-chat":
        ap.error("eldr-router-eldr-early needs --backend sglang-oai-chat (the early first token is for OpenAI endpoints)")
    work = Path(tempfile.mkdtemp(prefix="eldr-ttft-"))
    dataset = work / "eval_custom.jsonl"
    custom_dataset(EVAL, dataset)
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stock_args = {"extra_server_args": ["--no-eldr-capture"], "decode_allocation_policy": None, "policy": "jsq"}
    # The crossover runs this project's servers on both clusters.
    stock = Cluster(model_path=str(MODEL), num_prefill=1, num_decode=args.decoders, host=args.host,
                    log_dir=work / "stock", **({} if crossover else stock_args))
    eldr = Cluster(model_path=str(MODEL), num_prefill=1, num_decode=args.decoders, host=args.host,
                   log_dir=work / "eldr", **(stock_args if aa else {}))
    for c in (stock, eldr):
        c.log_dir.mkdir(parents=True, exist_ok=True)
    centroids = MODEL / f"eldr-centroids-{args.decoders}d.eldr"
    records: list[dict] = []
    interleaved: dict = {}
    fallbacks: dict[str, dict[str, float]] = {}
    smgs: list[Smg] = []
    try:
        with stock, eldr:
            smg_stock = smg_eldr = None
            if not crossover:  # the crossover goes through this router alone
                smg_stock = Smg(stock, args.host, work / "smg-stock.log")
                smgs.append(smg_stock)
                smg_eldr = Smg(eldr, args.host, work / "smg-eldr.log")
                smgs.append(smg_eldr)
            if not aa and not centroids.exists():
                centroids = eldr.calibrate(ROOT / "bench" / "data" / "prompts_calib.jsonl")
            print(f"clusters{'' if crossover else ' and smg'} up in {time.monotonic() - started:.0f} s", flush=True)
            rng = random.Random(args.seed)
            for rate in args.rates:
                for rep in range(first_repeat, first_repeat + args.repeats):
                    order = list(args.routes)
                    rng.shuffle(order)
                    for route in order:
                        cluster = stock if route == "stock-smg" else eldr
                        flush(cluster)
                        if route.startswith("eldr-router-"):
                            policy = route.removeprefix("eldr-router-").removesuffix("-early")
                            extra = [] if route.endswith("-early") else ["--no-early-first-token"]
                            url = eldr.start_router(policy=policy, centroids=str(centroids), extra=extra).url
                        else:
                            url = (smg_stock if route == "stock-smg" else smg_eldr).url
                        m = run_bench(url, dataset, args.num_prompts, rate, args.output_len, args.seed + rep,
                                      args.concurrency, backend=args.backend)
                        row = {"route": route, "repeat": rep, "rate": rate, "backend": args.backend,
                               "decoders": args.decoders,
                               **{k: m.get(v) for k, v in METRICS.items()}, "completed": m.get("completed"),
                               "num_prompts": args.num_prompts}
                        if route.startswith("eldr-router-"):
                            fb = labelled_counter(url, "eldr_fallbacks_total", "reason")
                            row["fallbacks"] = fb
                            row["first_token"] = labelled_counter(url, "eldr_first_token_total", "source")
                            for k, v in fb.items():
                                fallbacks.setdefault(route, {})[k] = fallbacks.get(route, {}).get(k, 0) + v
                            eldr.stop_router()
                        records.append(row)
                        print_row(rate, rep, route, row)
            if args.interleave and crossover:
                interleaved = run_crossover_mode(args, [stock, eldr], centroids)
            elif args.interleave:
                interleaved = run_interleaved_mode(args, stock, eldr, smg_stock, smg_eldr, centroids)
    finally:
        for s in smgs:
            s.stop()
    seconds = round(time.monotonic() - started)
    if records:
        report(earlier + records, args, fallbacks, [s.proc.pid for s in smgs], seconds)
    if args.interleave:
        write_interleaved(interleaved, args, [s.proc.pid for s in smgs], seconds)
    return 0


def print_row(rate: float, rep: int, route: str, row: dict) -> None:
    print(f"rate {rate:g} rep {rep} {route:>22}: TTFT p50 {row['ttft_p50_ms']:.1f} p99 "
          f"{row['ttft_p99_ms']:.1f} ms | TPOT p50 {row['tpot_p50_ms']:.2f} p99 "
          f"{row['tpot_p99_ms']:.2f} ms | {row['output_tok_s']:.1f} tok/s | "
          f"completed {row['completed']}/{row['num_prompts']}", flush=True)


def run_interleaved_mode(args: argparse.Namespace, stock: Cluster, eldr: Cluster, smg_stock: Smg, smg_eldr: Smg,
                         centroids: Path) -> dict:
    """The interleaved runs: every route up at once (one router), caches flushed before each run,
    two unrecorded warm-up groups first."""
    urls = {"stock-smg": smg_stock.url, "eldr-servers-smg": smg_eldr.url, "stock-smg-b": smg_eldr.url}
    router = next((r for r in args.interleave_routes if r.startswith("eldr-router-")), None)
    if router:
        urls[router] = eldr.start_router(policy=router.removeprefix("eldr-router-"), centroids=str(centroids),
                                         extra=["--no-early-first-token"]).url
    urls = {r: urls[r] for r in args.interleave_routes}
    prompts = load_prompts(EVAL, MODEL, args.interleave_groups, args.seed, list(urls))
    run_interleaved(urls, prompts[:2], 0, args.output_len, 1, args.seed, MODEL)  # warm-up, not recorded
    runs: list[dict] = []
    requests_: list[dict] = []
    rng = random.Random(args.seed)
    for rate in args.interleave_rates:
        for rep in range(args.interleave):
            for c in (stock, eldr):
                flush(c)
            seed, reqs = recorded_run(urls, prompts, args, rate, rep, rng)
            requests_ += reqs
            for route in urls:
                row = {"route": route, "repeat": rep, "rate": rate, "mode": "interleaved", "decoders": args.decoders,
                       "seed": seed, **run_summary(reqs, route)}
                runs.append(row)
                print_row(rate, rep, f"{route} (interleaved)", row)
    fallbacks = labelled_counter(urls[router], "eldr_fallbacks_total", "reason") if router else {}
    if router:
        eldr.stop_router()
    return {"runs": runs, "requests": requests_, "router_fallbacks": fallbacks}


def recorded_run(urls: dict[str, str], prompts: list, args: argparse.Namespace, rate: float, rep: int,
                 rng: random.Random) -> tuple[int, list[dict]]:
    """One recorded interleaved run of the routes in `urls`: its seed (drawn from `rng`) and its
    requests, tagged with the rate and the repeat."""
    seed = rng.randrange(1 << 30)
    reqs = run_interleaved(urls, prompts, rate, args.output_len, args.concurrency if rate > 0 else 1, seed, MODEL)
    for r in reqs:
        r |= {"rate": rate, "repeat": rep}
    return seed, reqs


def run_crossover_mode(args: argparse.Namespace, clusters: list[Cluster], centroids: Path) -> dict:
    """The interleaved runs of eldr against jsq: both clusters run this project's servers, each behind
    its own router, and the two policies swap clusters every run (a crossover), so a bias between the
    clusters' processes falls on each policy in half the runs. Both routers are started afresh for
    every run (eldr from the calibrated centroids) and get one unrecorded warm-up group."""
    prompts = load_prompts(EVAL, MODEL, args.interleave_groups, args.seed, list(CROSSOVER))
    runs: list[dict] = []
    requests_: list[dict] = []
    fallbacks: dict[str, float] = {}
    rng = random.Random(args.seed)
    for rate in args.interleave_rates:
        for rep in range(args.interleave):
            placed = dict(zip(CROSSOVER, clusters if rep % 2 == 0 else clusters[::-1]))
            urls = {}
            for route, cluster in placed.items():
                flush(cluster)
                urls[route] = cluster.start_router(policy=route.removeprefix("eldr-router-"), centroids=str(centroids),
                                                   extra=["--no-early-first-token"]).url
            run_interleaved(urls, prompts[:1], 0, args.output_len, 1, args.seed, MODEL)  # warm-up, not recorded
            seed, reqs = recorded_run(urls, prompts, args, rate, rep, rng)
            requests_ += reqs
            for route, cluster in placed.items():
                for k, v in labelled_counter(urls[route], "eldr_fallbacks_total", "reason").items():
                    fallbacks[k] = fallbacks.get(k, 0) + v
                cluster.stop_router()
                row = {"route": route, "repeat": rep, "rate": rate, "mode": "crossover", "decoders": args.decoders,
                       "seed": seed, "cluster": clusters.index(cluster), **run_summary(reqs, route)}
                runs.append(row)
                print_row(rate, rep, f"{route} (cluster {row['cluster']})", row)
    return {"runs": runs, "requests": requests_, "router_fallbacks": fallbacks}


def write_interleaved(result: dict, args: argparse.Namespace, smg_pids: list[int], seconds: int) -> None:
    """Prints the interleaved runs' paired ratios and writes them beside the shuffled runs' records."""
    routes = list(args.interleave_routes)
    pairs = [(r, "stock-smg") for r in routes if r != "stock-smg" and "stock-smg" in routes] + [
        (r, "eldr-servers-smg") for r in routes if r.startswith("eldr-router-") and "eldr-servers-smg" in routes]
    if set(routes) == set(CROSSOVER):
        pairs = [CROSSOVER]
    metrics = ["ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_ms", "output_tok_s"]
    ratios = paired_ratios(result["runs"], result["requests"], pairs, metrics)
    for s in ratios:
        boot = (f" | pooled {s['pooled_ratio']:.3f} [{s['boot95_low']:.3f}, {s['boot95_high']:.3f}]"
                if "pooled_ratio" in s else "")
        print(f"interleaved rate {s['rate']:g} {s['route']:>18} {s['metric']:>12} / {s['vs']}: {s['ratio_mean']:.3f} "
              f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}] {verdict(s)}{boot}")
    print(f"router fallbacks (interleaved): {result['router_fallbacks']}")
    path = args.interleave_out or args.out.with_name(args.out.stem + "_interleaved.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"config": {**config, "smg_flags": SMG_FLAGS, "smg": "1.13.0"},
                                "paired_ratios": ratios, "runs": result["runs"],
                                "router_fallbacks": result["router_fallbacks"], "smg_pids": smg_pids,
                                "seconds": seconds, "requests": result["requests"]}, indent=1) + "\n")
    plot_interleaved(result["requests"], path.with_suffix(".png"))
    print(f"-> {path} (+ .png)")


def report(records: list[dict], args: argparse.Namespace, fallbacks: dict, smg_pids: list[int],
           seconds: int | None) -> None:
    """Prints the paired ratios; writes the records, the summary and the plot."""
    summary = summarize(records)
    for s in summary:
        if s["metric"] in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "output_tok_s", "e2e_p50_ms"):
            print(f"{s['backend']:>10} rate {s['rate']:g} {s['route']:>22} {s['metric']:>12} / {s['vs']}: {s['ratio_mean']:.3f} "
                  f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}] {verdict(s)}")
    summary_path = args.out.with_name(args.out.stem + "_summary.json")
    if args.report_only and summary_path.exists():  # keep what only the run itself knew
        old = json.loads(summary_path.read_text())
        fallbacks, smg_pids, seconds = old.get("router_fallbacks", {}), old.get("smg_pids", []), old.get("seconds")
    print(f"router fallbacks: {fallbacks}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary_path.write_text(json.dumps(
        {"config": {**config, "smg_flags": SMG_FLAGS, "smg": "1.13.0"}, "paired_ratios": summary,
         "router_fallbacks": fallbacks, "smg_pids": smg_pids, "seconds": seconds}, indent=1) + "\n")
    plot(records, args.out.with_suffix(".png"))
    print(f"-> {args.out} (+ _summary.json, .png)")


if __name__ == "__main__":
    raise SystemExit(main())
