"""Measures real SGLang decode steps: forward time against (batch tokens, distinct (layer, expert)
pairs), for the shipped tiny model and its inflated twin (bench/inflated_twin.py), and fits the
named cost profiles the simulator uses: step = a + b·tokens + c·distinct_pairs.

Method. One `python -m sglang_eldr.launch_server` at a time, pinned to one core with one thread
(the client runs on the other), writes one line per decode step (SGLANG_ELDR_STEP_TRACE_FILE:
batch size, distinct pairs from SGLang's routed-experts capturer, wall time of ModelRunner.forward).
A *point* is a batch size with a prompt mix: `one` (all prompts from one domain: few distinct
experts) or `mixed` (one domain per prompt: many). Each point runs `--runs` times, all runs of a
model in one shuffled order, each a batch of concurrent greedy requests decoding `--decode-tokens`
tokens; only steps where the whole batch decodes count. The fit is least squares over all steps;
its interval is a bootstrap over runs. The per-pair slope is set beside what memory bandwidth
predicts (expert bytes / measured single-thread read bandwidth).

Idle check: the 1-minute load average is read before each model (waiting up to a minute for it to
fall below --max-load) and CPU steal is read over the run; both are recorded, and a busy machine is
flagged in the output and on stdout, never silently accepted.

    python bench/measure_step_cost.py                     # both models, writes bench/results/step_cost.json
    python bench/measure_step_cost.py --quick --out /tmp/s.json   # small model, 2 points (make test)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from inflated_twin import DST as INFLATED_DIR, SRC as SMALL_DIR, inflate  # noqa: E402

MODELS = {"cpu-small": SMALL_DIR, "cpu-inflated": INFLATED_DIR}
PROMPTS = ROOT / "bench" / "data" / "prompts_eval.jsonl"


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Single-thread streaming read bandwidth (best of `repeats` sums over a buffer far beyond L3)."""
    import torch

    torch.set_num_threads(1)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)  # (a bf16 sum is compute-bound here)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def cpu_steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies from /proc/stat (0, 0 where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def wait_idle(max_load: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    load = os.getloadavg()[0]
    while load > max_load and time.monotonic() < deadline:
        time.sleep(2.0)
        load = os.getloadavg()[0]
    return load


def start_server(model: Path, trace: Path, stats: Path, host: str, core: int, log: Path):
    from sglang_eldr.server_process import ServerProcess, free_port

    port = free_port(host)
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "SGLANG_CPU_OMP_THREADS_BIND": str(core), "SGLANG_ELDR_STEP_STATS_FILE": str(stats),
                "SGLANG_ELDR_STEP_TRACE_FILE": str(trace)})
    cmd = [sys.executable, "-m", "sglang_eldr.launch_server", "--model-path", str(model), "--host", host,
           "--port", str(port), "--eldr-capture", "--max-running-requests", "64"]
    server = ServerProcess(role="plain", port=port, log=log, host=host, cmd=cmd, env=env)
    server.start()
    server.wait_ready(600.0, "/model_info")
    return server


def run_batch(url: str, prompts: list[list[int]], decode_tokens: int) -> None:
    import requests

    errors: list[str] = []

    def one(ids: list[int]) -> None:
        r = requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": {
            "max_new_tokens": decode_tokens, "temperature": 0.0, "ignore_eos": True}}, timeout=600)
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"generate failed: {errors[0]}")


def fit(steps: list[dict]) -> tuple[np.ndarray, float]:
    x = np.array([[1.0, s["tokens"], s["distinct_pairs"]] for s in steps])
    y = np.array([s["forward_s"] for s in steps])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return coef, float(r2)


def bootstrap_ci(runs: list[list[dict]], n: int = 1000, seed: int = 0) -> np.ndarray:
    """95 % intervals of (a, b, c), resampling whole runs."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        pick = rng.integers(0, len(runs), len(runs))
        steps = [s for i in pick for s in runs[i]]
        if len({s["tokens"] for s in steps}) < 2:
            continue
        draws.append(fit(steps)[0])
    return np.percentile(np.array(draws), [2.5, 97.5], axis=0)


def measure_model(name: str, model: Path, args, prompts: dict[str, list[list[int]]], workdir: Path) -> dict:
    cfg = json.loads((model / "config.json").read_text())
    expert_bytes = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2
    trace, stats = workdir / f"{name}-steps.jsonl", workdir / f"{name}-stats.json"
    trace.unlink(missing_ok=True)
    server = start_server(model, trace, stats, args.host, args.server_core, workdir / f"{name}.log")
    try:
        run_batch(server.url, [prompts["python"][0]], 4)  # warm the decode path
        load = wait_idle(args.max_load)
        rng = random.Random(args.seed)
        domains = sorted(prompts)
        plan = [(b, mix, r) for b in args.batches for mix in args.mixes for r in range(args.runs)]
        rng.shuffle(plan)
        steal0 = cpu_steal_ticks()
        runs: dict[tuple[int, str], list[list[dict]]] = {}
        for b, mix, r in plan:
            if mix == "one":
                d = rng.choice(domains)
                batch = rng.sample(prompts[d], b)
            else:
                order = rng.sample(domains, len(domains))
                batch = [rng.choice(prompts[order[i % len(order)]]) for i in range(b)]
            start = trace.stat().st_size if trace.exists() else 0
            run_batch(server.url, batch, args.decode_tokens)
            time.sleep(0.2)  # the trace line of the last step is written after the response
            with trace.open() as f:
                f.seek(start)
                lines = [json.loads(l) for l in f if l.strip()]
            full = [s for s in lines if s["tokens"] == b]
            runs.setdefault((b, mix), []).append(full)
        steal1 = cpu_steal_ticks()
    finally:
        server.stop()
    all_runs = [run for rs in runs.values() for run in rs]
    steps = [s for run in all_runs for s in run]
    coef, r2 = fit(steps)
    ci = bootstrap_ci(all_runs)
    steal_pct = 100.0 * (steal1[0] - steal0[0]) / max(steal1[1] - steal0[1], 1)
    points = []
    for (b, mix), rs in sorted(runs.items()):
        ss = [s for run in rs for s in run]
        points.append({"tokens": b, "mix": mix, "runs": len(rs), "steps": len(ss),
                       "distinct_pairs_mean": float(np.mean([s["distinct_pairs"] for s in ss])),
                       "forward_ms_median": 1e3 * float(np.median([s["forward_s"] for s in ss])),
                       "forward_ms_p90": 1e3 * float(np.percentile([s["forward_s"] for s in ss], 90))})
    return {"model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
            "moe_intermediate_size": cfg["moe_intermediate_size"], "expert_bytes": expert_bytes,
            "a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]),
            "ci95": {"a": ci[:, 0].tolist(), "b": ci[:, 1].tolist(), "c": ci[:, 2].tolist()},
            "r2": r2, "steps": len(steps), "load_before": load, "steal_pct": steal_pct,
            "idle": load <= args.max_load and steal_pct < 5.0, "points": points,
            "source": f"bench/measure_step_cost.py: real SGLang decode steps of {model.name}, 1 core"}


def plot(result: dict, path: Path) -> None:
    """Median step time of every point against its distinct pairs, per profile, with the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = result["profiles"]
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4), squeeze=False)
    for ax, (name, p) in zip(axes[0], sorted(profiles.items())):
        for mix, marker in (("one", "o"), ("mixed", "s")):
            pts = [q for q in p["points"] if q["mix"] == mix]
            ax.scatter([q["distinct_pairs_mean"] for q in pts], [q["forward_ms_median"] for q in pts], marker=marker,
                       label=f"measured, prompts from {'one domain' if mix == 'one' else 'mixed domains'}")
            for q in pts:
                ax.annotate(str(q["tokens"]), (q["distinct_pairs_mean"], q["forward_ms_median"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        fit = [1e3 * (p["a"] + p["b"] * q["tokens"] + p["c"] * q["distinct_pairs_mean"]) for q in p["points"]]
        ax.scatter([q["distinct_pairs_mean"] for q in p["points"]], fit, marker="x", color="gray",
                   label=f"fit: c = {p['c'] * 1e6:.0f} µs/pair")
        ax.set_title(f"{name} ({p['expert_bytes'] / 2**10:.0f} KiB per expert)")
        ax.set_xlabel("distinct (layer, expert) pairs in the step (label: batch size)")
        ax.set_ylabel("ModelRunner.forward, median ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("real SGLang decode steps on this CPU: time vs experts read")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", choices=sorted(MODELS), default=sorted(MODELS),
                    help="which models to measure (default: both)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--mixes", nargs="+", choices=("one", "mixed"), default=["one", "mixed"])
    ap.add_argument("--runs", type=int, default=3, help="runs per point (default: %(default)s)")
    ap.add_argument("--decode-tokens", type=int, default=40, help="tokens each request decodes")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompts are cut to this many tokens")
    ap.add_argument("--host", default="127.0.0.1", help="the address the measured server listens on")
    ap.add_argument("--server-core", type=int, default=1, help="the core the server is pinned to")
    ap.add_argument("--max-load", type=float, default=1.0,
                    help="1-minute load average above which the machine counts as busy (flagged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small model, batches 1 and 4, one mix, 1 run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_cost.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of an existing --out and stop")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    if args.quick:
        args.profiles, args.batches, args.mixes, args.runs, args.decode_tokens = ["cpu-small"], [1, 4], ["mixed"], 1, 12

    from transformers import AutoTokenizer

    if "cpu-inflated" in args.profiles:
        inflate()
    tok = AutoTokenizer.from_pretrained(str(SMALL_DIR))
    prompts: dict[str, list[list[int]]] = {}
    for line in PROMPTS.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            prompts.setdefault(row["domain"], []).append(tok(row["text"])["input_ids"][: args.prompt_tokens])
    need = max(args.batches)
    if any(len(v) < need for v in prompts.values()):
        raise SystemExit(f"{PROMPTS}: every domain needs ≥ {need} prompts for batch {need}")

    bandwidth = read_bandwidth_gb_s(0.25 if args.quick else 1.0)
    workdir = ROOT / "target" / "step_cost"  # server logs and step traces (not committed)
    workdir.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for name in args.profiles:
        p = measure_model(name, MODELS[name], args, prompts, workdir)
        p["c_from_bandwidth"] = p["expert_bytes"] / (bandwidth * 1e9)
        profiles[name] = p
        flag = "" if p["idle"] else f"  BUSY MACHINE (load {p['load_before']:.2f}, steal {p['steal_pct']:.1f} %)"
        print(f"{name}: step = {p['a'] * 1e3:.2f} ms + {p['b'] * 1e3:.3f} ms/token + {p['c'] * 1e6:.1f} µs/pair "
              f"[{p['ci95']['c'][0] * 1e6:.1f}, {p['ci95']['c'][1] * 1e6:.1f}] (R² {p['r2']:.3f}, {p['steps']} steps)"
              f"; bandwidth predicts {p['c_from_bandwidth'] * 1e6:.1f} µs/pair{flag}")
    result: dict = {"bandwidth_read_gb_s_1_thread": bandwidth, "profiles": profiles,
                    "paper": "assumed, not measured: the ELDR paper's MI300X ratio, defined in bench/simulate.py"}
    if {"cpu-small", "cpu-inflated"} <= profiles.keys():
        s, i = profiles["cpu-small"], profiles["cpu-inflated"]
        extra = i["expert_bytes"] - s["expert_bytes"]
        result["inflation"] = {"slope_delta_s": i["c"] - s["c"], "bytes_delta": extra,
                               "implied_gb_s": extra / max(i["c"] - s["c"], 1e-12) / 1e9,
                               "bandwidth_gb_s": bandwidth}
        print(f"inflation adds {(i['c'] - s['c']) * 1e6:.1f} µs per pair for {extra / 2**20:.1f} MiB more per expert: "
              f"{result['inflation']['implied_gb_s']:.1f} GB/s implied vs {bandwidth:.1f} GB/s measured read bandwidth")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
