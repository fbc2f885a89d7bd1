"""Side-by-side serving comparison of ELDR against the load-balancing baselines on one real
SGLang PD cluster of the tiny trained MoE, with SGLang's own `bench_serving` as the client.

One cluster (1 prefill + N decoders) serves every policy: same servers, same prompts, same seed.
Policies run interleaved in a shuffled order per repeat to spread drift; each run restarts only
the router. Decode servers trace every decode step (batch size, distinct (layer, expert) pairs).
Each repeat also runs jsq a second time (`jsq#2`, an A/A pair): its ratio to jsq is the noise floor
of the run. Every policy's paired ratio to jsq (same repeat and rate) is reported with a 95 %
t-interval over the repeats. Writes bench/results/compare_policies.json and a TPOT plot.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sglang_eldr.launch_cluster import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intervals import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-qwen3-moe"
EVAL = ROOT / "bench" / "data" / "prompts_eval.jsonl"
CALIB = ROOT / "bench" / "data" / "prompts_calib.jsonl"
POLICIES = ["marginal", "eldr", "eldr-static", "rr", "random", "jsq", "p2c"]
AA = "jsq#2"  # jsq run again in every repeat: the A/A noise floor
BASELINES = ["rr", "random", "jsq", "p2c"]


def custom_dataset(path: Path, out: Path) -> int:
    """bench_serving's `custom` format: a user turn (held-out text) and a placeholder reply."""
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps({"conversations": [{"content": r["text"]}, {"content": "ok " * 8}]}) + "\n")
    return len(rows)


def distinct_per_step(steps: list[list[dict]], layers: int) -> float | None:
    """Mean distinct experts per MoE layer per decode step over every decoder's steps."""
    flat = [x for per in steps for x in per]
    return sum(x["distinct_pairs"] for x in flat) / len(flat) / layers if flat else None


def run_bench(url: str, dataset: Path, n: int, rate: float, out_len: int, seed: int, concurrency: int,
              backend: str = "sglang") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tmp:
        out_file = Path(tmp.name)
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", backend, "--base-url", url,
           "--dataset-name", "custom", "--dataset-path", str(dataset), "--num-prompts", str(n),
           "--request-rate", str(rate), "--max-concurrency", str(concurrency),
           "--sharegpt-output-len", str(out_len), "--seed", str(seed), "--tokenizer", str(MODEL),
           "--model", str(MODEL), "--output-file", str(out_file), "--disable-tqdm", "--warmup-requests", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_serving failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    lines = [l for l in out_file.read_text().splitlines() if l.strip()]
    out_file.unlink()
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoders", type=int, default=2)
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--centroids", default=None, help="centroid file (default: shipped, else calibrate)")
    ap.add_argument("--tau", type=float, default=0.1,
                    help="locality band width of the eldr policies (default: 0.1, the router's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-aa", action="store_true", help="skip the A/A run of jsq (no noise floor)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: one rate, few prompts, one repeat")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare_policies.json")
    ap.add_argument("--host", default="127.0.0.1",
                    help="the address the benchmark cluster listens on (default: 127.0.0.1, this machine only)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.num_prompts, args.output_len, args.repeats = [4.0], 12, 8, 1
        args.policies = ["eldr", "jsq"]
    if "jsq" not in args.policies:
        args.policies = [*args.policies, "jsq"]  # every ratio is to jsq
    runs = [*args.policies, *([] if args.no_aa else [AA])]
    layers = json.loads((MODEL / "config.json").read_text())["num_hidden_layers"]
    work = Path(tempfile.mkdtemp(prefix="eldr-compare-"))
    dataset = work / "eval_custom.jsonl"
    custom_dataset(EVAL, dataset)
    started = time.monotonic()
    results: list[dict] = []
    cluster = Cluster(model_path=str(MODEL), num_prefill=1, num_decode=args.decoders, log_dir=work, host=args.host,
                      step_stats=True, tau=args.tau)
    with cluster:
        centroids = args.centroids or (str(MODEL / f"eldr-centroids-{args.decoders}d.eldr")
                                       if (MODEL / f"eldr-centroids-{args.decoders}d.eldr").exists() else None)
        if centroids is None:
            centroids = str(cluster.calibrate(CALIB))
        print(f"cluster up in {time.monotonic() - started:.0f} s; centroids {centroids}", flush=True)
        rng = random.Random(args.seed)
        for rate in args.rates:
            for rep in range(args.repeats):
                order = list(runs)
                rng.shuffle(order)
                for policy in order:
                    router = cluster.start_router(policy=policy.split("#")[0], centroids=centroids)
                    marks = cluster.step_marks()
                    m = run_bench(router.url, dataset, args.num_prompts, rate, args.output_len,
                                  args.seed + rep, args.concurrency)
                    time.sleep(0.3)  # a decoder writes its last step's line just after the response
                    row = {"policy": policy, "rate": rate, "repeat": rep,
                           "tpot_p50_ms": m.get("median_tpot_ms"), "tpot_p99_ms": m.get("p99_tpot_ms"),
                           "itl_p50_ms": m.get("median_itl_ms"), "ttft_p50_ms": m.get("median_ttft_ms"),
                           "output_tok_s": m.get("output_throughput"), "completed": m.get("completed"),
                           "distinct_experts_per_layer_step": distinct_per_step(cluster.steps_since(marks), layers)}
                    results.append(row)
                    print(f"rate {rate:>4} rep {rep} {policy:>11}: TPOT p50 {row['tpot_p50_ms']:.2f} ms "
                          f"p99 {row['tpot_p99_ms']:.2f} ms TTFT p50 {row['ttft_p50_ms']:.1f} ms "
                          f"experts/step {row['distinct_experts_per_layer_step']}", flush=True)
                    cluster.stop_router()
    summary = summarize(results, runs)
    for line in summary["lines"]:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "runs": results, "summary": summary["table"],
                                    "seconds": round(time.monotonic() - started)}, indent=1) + "\n")
    plot(summary["table"], args.out.with_suffix(".png"))
    print(f"-> {args.out} (+ .png) in {time.monotonic() - started:.0f} s")
    return 0


def paired_vs_jsq(results: list[dict], rate: float, policy: str) -> dict[str, tuple[float, float, float]]:
    """Per metric, the mean ratio policy / jsq over the repeats (same repeat) and its 95 % interval."""
    out = {}
    for k in ("tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms", "output_tok_s", "distinct_experts_per_layer_step"):
        ratios = []
        for r in (x for x in results if x["rate"] == rate and x["policy"] == policy):
            base = next((x for x in results if x["rate"] == rate and x["policy"] == "jsq" and x["repeat"] == r["repeat"]), None)
            if base is not None and r[k] and base[k]:
                ratios.append(r[k] / base[k])
        if ratios:
            out[k] = t_interval(ratios)
    return out


def summarize(results: list[dict], policies: list[str]) -> dict:
    table = []
    lines = [f"{'rate':>5} {'policy':>11} | {'TPOT p50':>9} {'p99':>9} | {'TTFT p50':>9} | {'tok/s':>7} | experts/step"]
    for rate in sorted({r["rate"] for r in results}):
        for p in policies:
            rs = [r for r in results if r["rate"] == rate and r["policy"] == p]
            if not rs:
                continue
            agg = {"rate": rate, "policy": p}
            for k in ("tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "ttft_p50_ms", "output_tok_s",
                      "distinct_experts_per_layer_step"):
                vals = [r[k] for r in rs if r[k] is not None]
                agg[k] = float(np.mean(vals)) if vals else None
            table.append(agg)
            lines.append(f"{rate:>5} {p:>11} | {agg['tpot_p50_ms']:>8.2f}m {agg['tpot_p99_ms']:>8.2f}m | "
                         f"{agg['ttft_p50_ms']:>8.1f}m | {agg['output_tok_s']:>7.1f} | {agg['distinct_experts_per_layer_step']}")
            if p != "jsq":
                agg["vs_jsq"] = paired_vs_jsq(results, rate, p)
                for k, (m, lo, hi) in agg["vs_jsq"].items():
                    lines.append(f"{'':>19} {k:>32} / jsq: {m:.3f} [{lo:.3f}, {hi:.3f}]")
        cell = {r["policy"]: r for r in table if r["rate"] == rate}
        base = [cell[b] for b in BASELINES if b in cell]
        for name in ("marginal", "eldr", "eldr-static"):
            if name not in cell or not base:
                continue
            b50 = min(b["tpot_p50_ms"] for b in base)
            b99 = min(b["tpot_p99_ms"] for b in base)
            e = cell[name]
            lines.append(f"  -> rate {rate}: {name} TPOT p50 {100 * (e['tpot_p50_ms'] / b50 - 1):+.1f}% and p99 "
                         f"{100 * (e['tpot_p99_ms'] / b99 - 1):+.1f}% vs the best baseline")
            if "jsq" in cell and e["distinct_experts_per_layer_step"] and cell["jsq"]["distinct_experts_per_layer_step"]:
                lines.append(f"     distinct experts/step {100 * (e['distinct_experts_per_layer_step'] / cell['jsq']['distinct_experts_per_layer_step'] - 1):+.1f}% vs jsq; "
                             f"TTFT p50 {100 * (e['ttft_p50_ms'] / cell['jsq']['ttft_p50_ms'] - 1):+.1f}% vs jsq")
    return {"table": table, "lines": lines}


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("tpot_p50_ms", "tpot_p99_ms")):
        for p in sorted({r["policy"] for r in table}):
            pts = sorted((r["rate"], r[key]) for r in table if r["policy"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("tiny MoE, CPU PD cluster: TPOT vs rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
