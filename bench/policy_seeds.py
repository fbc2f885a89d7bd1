"""Seeds and confidence intervals for the simulator: each counts-using policy (and the domain
oracle) against the best load-only baseline, paired by seed (same arrivals, same request order,
same calibration).

For every cell (cost profile × decoders × load) and every seed, `simulate.run_cell` runs every
policy on one arrival trace. The best baseline of a cell is the one of rr/random/jsq/p2c with the
lowest mean over seeds (separately for p50 and p99); per seed, the paired relative difference
`policy / best − 1` is taken, and its mean is reported with a 95 % Student t-interval. A policy
"holds" a cell when the interval's upper end is ≤ +1 % (issue 11's criterion) and "wins" it when
the upper end is below 0.

TTFT (p50, p99) is compared the same way, against the baseline with the lowest mean TTFT.

Traces: bench/results/traces_tiny_moe.npz (the tiny trained model, greedy, up to 128 tokens with EOS
honoured; see simulate.py for the model of lengths, prefill and handoff). Writes
bench/results/policy_seeds.json and, with --simulate-json, the issue-11 records as a plain list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simulate  # noqa: E402
from intervals import t_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cell_summary(runs: list[list[dict]], policies: tuple[str, ...]) -> list[dict]:
    """runs: per seed, the rows of one cell. Per counts policy and metric, the paired difference."""
    out = []
    metrics = ["tpot_p50_ms", "tpot_p99_ms", "distinct_experts_per_layer_step"]
    if "ttft_p50_ms" in runs[0][0]:
        metrics += ["ttft_p50_ms", "ttft_p99_ms"]
    for metric in metrics:
        by = {p: [next(r[metric] for r in rows if r["policy"] == p) for rows in runs] for p in policies}
        if metric.startswith("distinct"):
            best = "jsq"
        else:
            best = min(simulate.BASELINES, key=lambda p: float(np.mean(by[p])))
        for p in (q for q in simulate.REPORTED if q in policies):
            diffs = [x / y - 1 for x, y in zip(by[p], by[best])]
            m, lo, hi = t_interval(diffs)
            out.append({"policy": p, "metric": metric, "vs": best, "n": len(diffs), "mean": m,
                        "ci95_low": lo, "ci95_high": hi, "policy_mean": float(np.mean(by[p])),
                        "vs_mean": float(np.mean(by[best]))})
    return out


def as_record(cell: dict, seeds: int) -> list[dict]:
    """One record per reported policy in issue 11's format: differences in % against the best
    baseline of the cell, each {"mean", "ci_low", "ci_high"}."""
    out = []
    for policy in dict.fromkeys(s["policy"] for s in cell["summary"]):
        by = {s["metric"]: s for s in cell["summary"] if s["policy"] == policy}
        pct = lambda s: {"mean": 100 * s["mean"], "ci_low": 100 * s["ci95_low"], "ci_high": 100 * s["ci95_high"]}  # noqa: E731
        out.append({"profile": cell["cost"], "workers": cell["workers"], "load": cell["load"], "policy": policy,
                    "seeds": seeds, "delta_p50_pct": pct(by["tpot_p50_ms"]), "delta_p99_pct": pct(by["tpot_p99_ms"]),
                    "vs_p50": by["tpot_p50_ms"]["vs"], "vs_p99": by["tpot_p99_ms"]["vs"],
                    "experts_vs_jsq_pct": pct(by["distinct_experts_per_layer_step"]),
                    **({"delta_ttft_p50_pct": pct(by["ttft_p50_ms"]), "delta_ttft_p99_pct": pct(by["ttft_p99_ms"]),
                        "vs_ttft_p50": by["ttft_p50_ms"]["vs"]} if "ttft_p50_ms" in by else {})})
    return out


def plot(cells: list[dict], path: Path) -> None:
    """TPOT p50 and p99 change vs the best baseline against load, with the 95 % intervals as bands:
    one row per profile and metric, one column per decoder count, one line per reported policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(dict.fromkeys(c["cost"] for c in cells))
    workers = sorted({c["workers"] for c in cells})
    rows = [(p, m) for p in profiles for m in ("tpot_p50_ms", "tpot_p99_ms")]
    fig, axes = plt.subplots(len(rows), len(workers), figsize=(4 * len(workers), 2.8 * len(rows)), squeeze=False,
                             sharex=True)
    for (profile, metric), line in zip(rows, axes):
        for w, ax in zip(workers, line):
            sel = sorted((c for c in cells if c["cost"] == profile and c["workers"] == w), key=lambda c: c["load"])
            for policy in dict.fromkeys(s["policy"] for c in sel for s in c["summary"]):
                pts = [(c["load"], next(s for s in c["summary"] if s["policy"] == policy and s["metric"] == metric))
                       for c in sel]
                x = [p[0] for p in pts]
                ax.plot(x, [100 * p[1]["mean"] for p in pts], marker="o", label=policy)
                ax.fill_between(x, [100 * p[1]["ci95_low"] for p in pts], [100 * p[1]["ci95_high"] for p in pts],
                                alpha=0.2)
            ax.axhline(0, color="black", lw=0.8)
            ax.axhline(1, color="red", lw=0.8, ls="--")
            ax.set_title(f"{profile}, W={w}: {metric.split('_')[1]}", fontsize=9)
            ax.set_ylabel("Δ vs best baseline (%)", fontsize=8)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("load (fraction of capacity)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"simulated TPOT change vs the best of rr/random/jsq/p2c ({cells[0]['summary'][0]['n']} seeds, 95 % CI; red: +1 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=ROOT / "bench" / "results" / "traces_tiny_moe.npz")
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--load", type=float, nargs="+", default=[0.6, 0.85, 0.95])
    ap.add_argument("--cost", nargs="+", default=["cpu-inflated", "paper"], choices=simulate.COSTS)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--requests-per-worker", type=int, default=40)
    ap.add_argument("--policies", nargs="+", default=list(simulate.POLICIES), choices=simulate.POLICIES)
    ap.add_argument("--marginal-told", type=lambda t: tuple(float(x) for x in t.split(",")), default=None,
                    metavar="A,B,C", help="the marginal policy predicts with this step cost instead of the simulated "
                                          "profile (e.g. 0,0,1: the router's --step-cost default)")
    simulate.add_model_options(ap)
    ap.add_argument("--c-scale", type=float, default=1.0,
                    help="the marginal policy's per-expert cost is the profile's times this (a mis-specified "
                         "profile; default 1: the profile the simulator runs)")
    ap.add_argument("--sharpness", type=float, default=simulate.DEFAULT_SHARPNESS,
                    help="the marginal policy's sharpness γ, q ∝ counts^γ (default: the router's, "
                         f"{simulate.DEFAULT_SHARPNESS:g})")
    ap.add_argument("--quick", action="store_true", help="smoke mode: W=8, one load, cpu, 3 seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "policy_seeds.json")
    ap.add_argument("--records-out", type=Path, default=None,
                    help="issue 11's records as a plain JSON list (default: bench/results/simulate.json beside the "
                         "default --out, else OUT with the suffix .records.json)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="PART",
                    help="combine the outputs of runs split by profile (e.g. one process per core) into --out, the "
                         "records file and the plot, and stop")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of an existing --out and stop")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["cells"], args.out.with_suffix(".png"))
        return 0
    if args.merge:
        parts = [json.loads(m.read_text()) for m in args.merge]
        meta = {**parts[0]["meta"], "costs": {k: v for d in parts for k, v in d["meta"]["costs"].items()},
                "seconds": sum(d["meta"]["seconds"] for d in parts), "merged_from": [str(m) for m in args.merge]}
        write(args, meta, [c for d in parts for c in d["cells"]], [r for d in parts for r in d["records"]])
        return 0
    if args.quick:
        args.workers, args.load, args.cost, args.seeds, args.requests_per_worker = [8], [0.85], ["cpu-small"], 3, 20
    policies = tuple(args.policies)
    simulate.MARGINAL_C_SCALE = args.c_scale
    simulate.MARGINAL_SHARPNESS = args.sharpness
    simulate.MARGINAL_TOLD = args.marginal_told
    simulate.configure(args)
    if not set(simulate.BASELINES) <= set(policies):
        ap.error("--policies must include every baseline (rr random jsq p2c): the best of them is the reference")
    full = simulate.load_traces(args.traces)
    layers, experts = full.prefill.shape[1:]
    costs = {n: simulate.cost_model(n, layers, experts) for n in args.cost}
    started = time.perf_counter()
    cells = []
    for cost in args.cost:
        for w in args.workers:
            capacity = simulate.capacity_rate(full, w, costs[cost], args.max_batch)
            for load in args.load:
                runs = []
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    perm = rng.permutation(len(full.decode))
                    half = len(perm) // 2
                    pick = lambda idx: simulate.Trace(full.domain[idx], full.prefill[idx],  # noqa: E731
                                                      [full.decode[i] for i in idx], full.experts)
                    calib, evalset = pick(perm[:half]), pick(perm[half:])
                    runs.append(simulate.run_cell(evalset, calib, w, args.tau, load, costs[cost], args.max_batch,
                                                  max(200, args.requests_per_worker * w), seed, policies, capacity))
                summary = cell_summary(runs, policies)
                cells.append({"cost": cost, "workers": w, "load": load, "capacity_rps": capacity,
                              "refits": float(np.mean([r["refits"] for run in runs for r in run if r["policy"] == "eldr"] or [0])),
                              "summary": summary})
                for s in summary:
                    verdict = ("wins" if s["ci95_high"] < 0 else "holds" if s["ci95_high"] <= 0.01 else "REGRESSES"
                               if s["ci95_low"] > 0.01 else "unresolved")
                    print(f"{cost:>12} W={w:<4} load {load:<4} {s['policy']:>8} {s['metric']:>32} vs {s['vs']:>6}: "
                          f"{100 * s['mean']:+6.1f}% [{100 * s['ci95_low']:+6.1f}, {100 * s['ci95_high']:+6.1f}] {verdict}",
                          flush=True)
    records = [as_record(c, args.seeds) for c in cells]
    records = [r for rs in records for r in rs]
    meta = {"traces": str(args.traces), "seeds": args.seeds, "max_imbalance": simulate.MAX_IMBALANCE,
            "marginal_cap": simulate.MARGINAL_CAP,
            "imbalance_fraction": simulate.IMBALANCE_FRACTION, "handoff": simulate.HANDOFF.__dict__ if simulate.HANDOFF else None, "c_scale": args.c_scale, "sharpness": args.sharpness, "marginal_told": args.marginal_told, "tau": args.tau, "max_batch": args.max_batch,
            "lengths": simulate.LENGTHS, "refit": simulate.REFIT.__dict__ if simulate.REFIT else None,
            "requests_per_worker": args.requests_per_worker, "costs": {c: costs[c].__dict__ for c in args.cost},
            "seconds": round(time.perf_counter() - started, 1)}
    write(args, meta, cells, records)
    return 0


def write(args: argparse.Namespace, meta: dict, cells: list[dict], records: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records, "cells": cells}, indent=1) + "\n")
    default_out = ROOT / "bench" / "results" / "policy_seeds.json"
    records_out = args.records_out or (default_out.with_name("simulate.json") if args.out == default_out
                                       else args.out.with_suffix(".records.json"))
    records_out.write_text(json.dumps(records, indent=1) + "\n")
    plot(cells, args.out.with_suffix(".png"))
    print(f"-> {args.out}, {records_out} in {meta['seconds']} s")


if __name__ == "__main__":
    raise SystemExit(main())
