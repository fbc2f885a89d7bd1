"""Paired step replay: batch compositions the simulator produces for the default policy and for the
best baseline, replayed through a real SGLang decode server of the inflated twin, so the simulated
step-time difference is checked against real weight reads.

Method. One simulator cell (`--workers`, `--load`, profile `cpu-inflated`, one seed; prefill and
handoff as bench/simulate.py models them) runs the policy and every baseline; the best baseline is
the one with the lowest TPOT p50 in that run. From each of the two step logs, `--compositions`
decode steps are drawn from the steady state (the middle 80 % of the run), each with a chance in
proportion to its batch size, so the mean step time of a draw is the step time a decoded token
sees (what TPOT tracks), not the mean over steps of any size. A composition
is the set of trace requests a decoder ran together, each at its own decode position. It is
replayed as concurrent greedy requests whose input is the prompt plus the tokens the request had
been fed up to its position (teacher forcing from the trace), each decoding `--steps` more steps;
the server's per-step trace (SGLANG_ELDR_STEP_TRACE_FILE: ModelRunner.forward wall time) gives the
time of every step in which the whole composition decoded. Repeats replay every composition of
both arms again, in a new shuffled order (interleaved); after the first, the radix cache holds the
inputs, so prefill work shrinks, but only decode steps are timed.

Reported: per repeat, mean step time of the drawn steps, policy / baseline; the mean ratio over repeats with its 95 %
t-interval; the simulator's predicted ratio for the same steps (the cost profile applied to the
trace's expert ids at the replayed positions) and for the whole simulated run (token-weighted); real and predicted
distinct pairs per step.

    python bench/step_replay.py                        # writes bench/results/step_replay.json
    python bench/step_replay.py --quick --out /tmp/r.json   # small model, few steps (make test)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import simulate  # noqa: E402
from intervals import t_interval  # noqa: E402
from measure_step_cost import MODELS, cpu_steal_ticks, run_batch, start_server, wait_idle  # noqa: E402

from sglang_eldr.decode_policy import DEFAULT_DECODE_POLICY  # noqa: E402


def simulated_steps(full: simulate.Trace, policy: str, workers: int, load: float, cost: simulate.CostModel,
                    seed: int, requests_per_worker: int, max_batch: int = 16) -> tuple[dict[str, list], dict]:
    """Runs the cell for `policy` and every baseline; returns each arm's steps (trace indices of
    `full`) and a summary naming the best baseline."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(full.decode))
    half = len(perm) // 2
    pick = lambda idx: simulate.Trace(full.domain[idx], full.prefill[idx], [full.decode[i] for i in idx],  # noqa: E731
                                      full.experts)
    calib, evalset = pick(perm[:half]), pick(perm[half:])
    capacity = simulate.capacity_rate(full, workers, cost, max_batch, seed)
    n = max(200, requests_per_worker * workers)
    rate = load * capacity
    order = rng.integers(0, len(evalset.decode), n)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    lengths = simulate.draw_lengths(rng, n)
    handoff = simulate.HANDOFF
    prefill_count = simulate.prefill_servers(evalset, order, rate, cost, handoff) if handoff else 0
    logs: dict[str, list] = {}
    p50: dict[str, float] = {}
    for name in (policy, *simulate.BASELINES):
        router = simulate.make_router(name, workers, calib, 0.1, seed, cost, max_batch)
        refit = None
        if isinstance(router, tuple):
            router, refit = router
        log: list[simulate.Step] = []
        res = simulate.simulate(evalset, order, arrivals, router, workers, cost, max_batch,
                                use_counts=name in simulate.COUNTS_POLICIES, lengths=lengths, refit=refit,
                                handoff=handoff, prefill_count=prefill_count, step_log=log)
        p50[name] = float(np.percentile(res.tpot[n // 10:], 50))
        end = max(s.start for s in log)
        steady = [s for s in log if 0.1 * end <= s.start <= 0.9 * end]
        back = perm[half:]  # evalset index -> full trace index
        logs[name] = [simulate.Step(s.start, s.worker, tuple(int(back[r]) for r in s.requests), s.positions,
                                    s.distinct_pairs, s.seconds) for s in steady]
    best = min(simulate.BASELINES, key=lambda b: p50[b])
    summary = {"capacity_rps": capacity, "rate_rps": rate, "requests": n, "tpot_p50_ms": {k: 1e3 * v for k, v in p50.items()},
               "best_baseline": best,
               "sim_token_weighted_step_ms": {k: 1e3 * float(np.average([s.seconds for s in v], weights=token_weights(v)))
                                              for k, v in logs.items()}}
    return {policy: logs[policy], best: logs[best]}, summary


def token_weights(log: list[simulate.Step]) -> np.ndarray:
    """Steps drawn in proportion to their batch size: a step's time is paid by every token it
    makes, so the mean over such a draw is the step time a decoded token sees (what TPOT tracks)."""
    w = np.array([len(s.requests) for s in log], dtype=float)
    return w / w.sum()


def predicted(full: simulate.Trace, comp: simulate.Step, steps: int, cost: simulate.CostModel) -> tuple[list[float], list[int]]:
    """The cost profile on the trace's own expert ids at the replayed positions."""
    L, E = full.prefill.shape[1:]
    offset = (np.arange(L) * E)[None, :, None]
    secs, pairs = [], []
    for i in range(steps):
        ids = np.stack([full.decode[r][min(p + i, len(full.decode[r]) - 1)] for r, p in
                        zip(comp.requests, comp.positions)]).astype(np.int64)
        d = len(np.unique(ids + offset))
        pairs.append(d)
        secs.append(cost.a + cost.b * len(comp.requests) + cost.c * d)
    return secs, pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=ROOT / "bench" / "results" / "traces_tiny_moe.npz",
                    help="from bench/record_traces.py (needs the prompt and fed token ids)")
    ap.add_argument("--policy", default=DEFAULT_DECODE_POLICY, choices=simulate.COUNTS_POLICIES)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--load", type=float, default=0.85)
    ap.add_argument("--model", choices=sorted(MODELS), default="cpu-inflated",
                    help="the server's model and the simulated profile (default: %(default)s)")
    ap.add_argument("--compositions", type=int, default=40, help="steps drawn from each arm's simulated log")
    ap.add_argument("--steps", type=int, default=8, help="decode steps replayed per composition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests-per-worker", type=int, default=40)
    simulate.add_model_options(ap)
    ap.add_argument("--host", default="127.0.0.1", help="the address the replay server listens on")
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--max-load", type=float, default=1.0, help="load average above which the machine is flagged busy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small model, W=8, 3 compositions × 3 steps, 2 repeats")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_replay.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.workers, args.compositions, args.steps, args.repeats = "cpu-small", 8, 3, 3, 2
        args.requests_per_worker = 20
    simulate.configure(args)
    z = np.load(args.traces, allow_pickle=False)
    if "tokens" not in z or "prompt_ids" not in z:
        raise SystemExit(f"{args.traces} has no prompt/fed token ids: re-record it with bench/record_traces.py")
    full = simulate.load_traces(args.traces)
    offs = np.concatenate([[0], np.cumsum(z["decode_lengths"])])
    poffs = np.concatenate([[0], np.cumsum(z["prompt_lengths"])])
    tokens = [z["tokens"][offs[i]:offs[i + 1]].tolist() for i in range(len(full.decode))]
    prompts = [z["prompt_ids"][poffs[i]:poffs[i + 1]].tolist() for i in range(len(full.decode))]
    L, E = full.prefill.shape[1:]
    cost = simulate.cost_model(args.model, L, E)

    logs, sim = simulated_steps(full, args.policy, args.workers, args.load, cost, args.seed, args.requests_per_worker)
    arms = list(logs)  # [policy, best baseline]
    rng = np.random.default_rng(args.seed + 1)
    chosen = {a: [logs[a][i] for i in rng.choice(len(logs[a]), min(args.compositions, len(logs[a])), replace=False,
                                                 p=token_weights(logs[a]))] for a in arms}
    pred = {a: [predicted(full, c, args.steps, cost) for c in chosen[a]] for a in arms}
    print(f"simulated W={args.workers} load {args.load} {args.model}: {args.policy} vs best baseline {sim['best_baseline']}; "
          f"mean batch {np.mean([len(c.requests) for c in chosen[arms[0]]]):.1f} vs "
          f"{np.mean([len(c.requests) for c in chosen[arms[1]]]):.1f}", flush=True)

    model = MODELS[args.model]
    if args.model == "cpu-inflated":
        from inflated_twin import inflate

        inflate()
    workdir = ROOT / "target" / "step_replay"
    workdir.mkdir(parents=True, exist_ok=True)
    trace = workdir / "steps.jsonl"
    trace.unlink(missing_ok=True)
    server = start_server(model, trace, workdir / "stats.json", args.host, args.server_core, workdir / "server.log")
    measured: dict[str, list[list[dict]]] = {a: [] for a in arms}  # per repeat, the arm's replayed steps
    short = 0
    try:
        run_batch(server.url, [prompts[0][:16]], 4)  # warm the decode path
        load = wait_idle(args.max_load)
        steal0 = cpu_steal_ticks()
        order = [(a, i) for a in arms for i in range(len(chosen[a]))]
        for rep in range(args.repeats):
            random.Random(args.seed * 1000 + rep).shuffle(order)
            got: dict[str, list[dict]] = {a: [] for a in arms}
            for a, i in order:
                comp = chosen[a][i]
                inputs = [prompts[r] + tokens[r][:p] for r, p in zip(comp.requests, comp.positions)]
                start = trace.stat().st_size if trace.exists() else 0
                run_batch(server.url, inputs, args.steps + 1)  # the prefill samples one token, then `steps` decode
                time.sleep(0.1)  # the last step's line is written after the response
                with trace.open() as f:
                    f.seek(start)
                    lines = [json.loads(l) for l in f if l.strip()]
                full_steps = [s for s in lines if s["tokens"] == len(inputs)][: args.steps]
                short += len(full_steps) < args.steps
                for k, s in enumerate(full_steps):
                    got[a].append({"comp": i, "step": k, "forward_s": s["forward_s"],
                                   "distinct_pairs": s["distinct_pairs"], "predicted_s": pred[a][i][0][k],
                                   "predicted_pairs": pred[a][i][1][k], "batch": len(inputs)})
            for a in arms:
                measured[a].append(got[a])
            r = np.mean([s["forward_s"] for s in got[arms[0]]]) / np.mean([s["forward_s"] for s in got[arms[1]]])
            print(f"repeat {rep + 1}/{args.repeats}: mean step {args.policy} / {arms[1]} = {r:.4f} "
                  f"({len(got[arms[0]])} and {len(got[arms[1]])} steps)", flush=True)
        steal1 = cpu_steal_ticks()
    finally:
        server.stop()

    ratios = [float(np.mean([s["forward_s"] for s in p]) / np.mean([s["forward_s"] for s in b]))
              for p, b in zip(measured[arms[0]], measured[arms[1]])]
    mean, lo, hi = t_interval(ratios)
    flat = {a: [s for rep in measured[a] for s in rep] for a in arms}
    pred_ratio = float(np.mean([s["predicted_s"] for s in flat[arms[0]]]) /
                       np.mean([s["predicted_s"] for s in flat[arms[1]]]))
    steal_pct = 100.0 * (steal1[0] - steal0[0]) / max(steal1[1] - steal0[1], 1)
    result = {
        "policy": args.policy, "baseline": arms[1], "workers": args.workers, "load": args.load, "profile": args.model,
        "ratio": mean, "ci_low": lo, "ci_high": hi, "ratios": ratios, "predicted_ratio": pred_ratio,
        "predicted_ratio_whole_run": sim["sim_token_weighted_step_ms"][arms[0]] / sim["sim_token_weighted_step_ms"][arms[1]],
        "steps_per_repeat": {a: [len(rep) for rep in measured[a]] for a in arms},
        "compositions": {a: len(chosen[a]) for a in arms}, "steps_per_composition": args.steps,
        "repeats": args.repeats, "compositions_short": short,
        "mean_batch": {a: float(np.mean([s["batch"] for s in flat[a]])) for a in arms},
        "mean_step_ms": {a: 1e3 * float(np.mean([s["forward_s"] for s in flat[a]])) for a in arms},
        "predicted_step_ms": {a: 1e3 * float(np.mean([s["predicted_s"] for s in flat[a]])) for a in arms},
        "distinct_pairs": {a: float(np.mean([s["distinct_pairs"] for s in flat[a]])) for a in arms},
        "predicted_pairs": {a: float(np.mean([s["predicted_pairs"] for s in flat[a]])) for a in arms},
        "simulated": sim, "load_before": load, "steal_pct": steal_pct,
        "idle": load <= args.max_load and steal_pct < 5.0, "seed": args.seed,
        "handoff": simulate.HANDOFF.__dict__ if simulate.HANDOFF else None, "lengths": simulate.LENGTHS,
        "marginal_cap": simulate.MARGINAL_CAP,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    flag = "" if result["idle"] else f"  BUSY MACHINE (load {load:.2f}, steal {steal_pct:.1f} %)"
    print(f"real mean step {args.policy} / {arms[1]}: {mean:.4f} [{lo:.4f}, {hi:.4f}] over {args.repeats} repeats; "
          f"predicted {pred_ratio:.4f} for the same steps, {result['predicted_ratio_whole_run']:.4f} over the whole "
          f"simulated run; distinct pairs real {result['distinct_pairs'][arms[0]]:.1f} / {result['distinct_pairs'][arms[1]]:.1f}"
          f", predicted {result['predicted_pairs'][arms[0]]:.1f} / {result['predicted_pairs'][arms[1]]:.1f}{flag}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
