"""Trace-driven discrete-event simulator of a decode cluster under each routing policy.

Decoders run continuous batching: every step, each running request emits one token, and the step
takes `a + b·tokens + c·distinct_experts` seconds, where distinct_experts = distinct (layer, expert)
pairs the batch activates in that step. Requests arrive as a Poisson process; each carries its
prefill counts [L, E] (what the router sees) and its per-step decode expert ids [T, L, k] (what
the decoder pays for). Routing decisions come from `sglang_eldr.router_rs` (the same Rust router
the load balancer uses); a request is acquired on arrival and released when it finishes.

Traces: `--traces FILE.npz` recorded from the tiny trained model (bench/record_traces.py), or
`--synthetic` domains with a tunable prefill->decode correlation.
Cost model: coefficients per named profile (`--cost`), each stating where it was measured.
Decode lengths: each request decodes `min(its trace, a draw from --lengths)` tokens (the tiny model
rarely emits EOS: 15 of the 480 recorded traces end there before 128 tokens, so the length
distribution is stated, not observed).
Load: a fraction of the capacity, measured as the saturation throughput of the best load-only
baseline (every request queued at t = 0; the best of rr/random/jsq/p2c in requests per second).
Online refit (`--refit INTERVAL,WINDOW`, the load balancer's 2.5 s / 5 s): the eldr router's centroids
are refitted in simulated time on the recent requests' counts and swapped in, aligned, as
`sglang_eldr.refit` does.
Time to first token (`--handoff`): a request first queues for one of P prefill servers (FIFO, one
request at a time, prefill time from the same cost profile: a + b·prompt tokens + c·distinct pairs
of its prompt; P sized so prefill is busy UTIL of the time at the offered load), then waits for its
counts (the ZMQ hop and the decision), then the decoder POST/admission/bootstrap and the KV
transfer (per prompt token), and only then joins the chosen decoder's queue. The decoder is
chosen, and its load counted, at the end of the counts wait, as the load balancer does for every
policy. TTFT is the end of the request's first decode step minus its arrival. The handoff
constants are assumed (stated in the JSON), not measured.
"""

from __future__ import annotations

import argparse
import heapq
from collections import deque
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sglang_eldr import fitting
from sglang_eldr.signature import build_signatures
from sglang_eldr.router_rs import DEFAULT_SHARPNESS, BaselineRouter, LocalityBandRouter, MarginalCostRouter

POLICIES = ("eldr", "marginal", "domain", "rr", "random", "jsq", "p2c")
BASELINES = ("rr", "random", "jsq", "p2c")
COUNTS_POLICIES = ("eldr", "marginal")  # the policies that see the prefill counts
REPORTED = (*COUNTS_POLICIES, "domain")  # compared with the best baseline in the summaries


@dataclass(frozen=True)
class CostModel:
    name: str
    a: float  # fixed seconds per step (attention, sampling, launch overhead)
    b: float  # seconds per token in the batch
    c: float  # seconds per distinct (layer, expert) pair read in the step
    source: str


STEP_COST = Path(__file__).resolve().parent / "results" / "step_cost.json"
MEASURED = ("cpu-small", "cpu-inflated")  # real SGLang decode steps, bench/measure_step_cost.py


def measured_cost(name: str) -> CostModel:
    """A profile fitted by bench/measure_step_cost.py to real SGLang decode steps on this machine."""
    if not STEP_COST.exists():
        raise SystemExit(f"{STEP_COST} is missing: run bench/measure_step_cost.py first")
    profiles = json.loads(STEP_COST.read_text()).get("profiles", {})
    if name not in profiles:
        raise SystemExit(f"{STEP_COST} has no profile {name!r} (has {sorted(profiles)}): "
                         f"run bench/measure_step_cost.py --profiles {name}")
    p = profiles[name]
    return CostModel(name, a=max(p["a"], 0.0), b=max(p["b"], 0.0), c=p["c"], source=p["source"])


def paper_cost(layers: int = 4, experts: int = 64) -> CostModel:
    """Assumed, not measured: the ELDR paper's MI300X ratio, a MoE layer costs x4.7 more at 128
    than at 16 active experts (of 128). Scaled to the trace geometry: per-layer MoE time
    m(d) = m0 + m1·d with m(E)/m(E/8) = 4.7, and MoE ≈ 60 % of a step at 1/8 of the experts active."""
    m1_over_m0 = 3.7 / (experts - 4.7 * experts / 8)
    m0 = 1e-4  # seconds; only ratios matter for the comparison
    m1 = m1_over_m0 * m0
    moe_small = layers * (m0 + m1 * experts / 8)
    return CostModel("paper", a=layers * m0 + moe_small * 0.4 / 0.6, b=0.0, c=m1,
                     source="assumed: ELDR paper, MI300X, MoE layer x4.7 from 16 to 128 active experts")


COSTS = (*MEASURED, "paper")


def cost_model(name: str, layers: int, experts: int) -> CostModel:
    return paper_cost(layers, experts) if name == "paper" else measured_cost(name)


@dataclass
class Trace:
    domain: np.ndarray  # [N] int
    prefill: np.ndarray  # [N, L, E] int32
    decode: list[np.ndarray]  # N × [T, L, k] int16
    experts: int


def synthetic_traces(n: int, domains: int, layers: int, experts: int, top_k: int, out_len: int,
                     correlation: float, seed: int) -> Trace:
    """Domains prefer their own experts; a decode token follows its domain's preference with
    probability `correlation`, else the global mix. Prefill tokens always follow the domain."""
    rng = np.random.default_rng(seed)
    prefs = rng.dirichlet(np.full(experts, 0.15), size=(domains, layers))
    glob = prefs.mean(axis=0)
    dom = rng.integers(0, domains, n)
    pre = np.zeros((n, layers, experts), dtype=np.int32)
    dec = []
    for i, d in enumerate(dom):
        for l in range(layers):
            picks = _topk_sample(rng, prefs[d, l], top_k, 96)
            pre[i, l] = np.bincount(picks.ravel(), minlength=experts)
        steps = np.empty((out_len, layers, top_k), dtype=np.int16)
        follow = rng.random(out_len) < correlation
        for l in range(layers):
            steps[follow, l] = _topk_sample(rng, prefs[d, l], top_k, int(follow.sum()))
            steps[~follow, l] = _topk_sample(rng, glob[l], top_k, int((~follow).sum()))
        dec.append(steps)
    return Trace(dom, pre, dec, experts)


def _topk_sample(rng, p, k, n) -> np.ndarray:
    """n tokens, each picking k distinct experts with probabilities p (Gumbel top-k)."""
    if n == 0:
        return np.empty((0, k), dtype=np.int16)
    g = np.log(p)[None, :] - np.log(-np.log(rng.random((n, len(p)))))
    return np.argpartition(-g, k - 1, axis=1)[:, :k].astype(np.int16)


def load_traces(path: Path) -> Trace:
    z = np.load(path, allow_pickle=False)
    lengths = z["decode_lengths"]
    flat = z["decode"]
    offs = np.concatenate([[0], np.cumsum(lengths)])
    dec = [flat[offs[i]:offs[i + 1]] for i in range(len(lengths))]
    return Trace(z["domain"], z["prefill"], dec, int(z["prefill"].shape[2]))


class DomainOracle:
    """The oracle baseline: decoders split into one pool per domain label, sized to the mix of the
    trace (largest remainder, at least one decoder each while there are enough), least-loaded
    within the pool. It knows what no router knows (the true domain of every request); with fewer
    decoders than domains, pools are shared round-robin."""

    def __init__(self, workers: int, domains: np.ndarray):
        labels, counts = np.unique(domains, return_counts=True)
        share = counts / counts.sum() * workers
        size = np.maximum(np.floor(share).astype(int), 1 if workers >= len(labels) else 0)
        while size.sum() > workers:
            size[np.argmax(size - share)] -= 1
        while size.sum() < workers:
            size[np.argmax(share - size)] += 1
        starts = np.concatenate([[0], np.cumsum(size)])
        self.pools = {int(lab): list(range(starts[i], starts[i + 1])) or [i % workers] for i, lab in enumerate(labels)}
        self._loads = np.zeros(workers, dtype=np.int64)

    def acquire_domain(self, domain: int) -> int:
        pool = self.pools[int(domain)]
        w = min(pool, key=lambda k: (self._loads[k], k))
        self._loads[w] += 1
        return w

    def release(self, w: int) -> None:
        self._loads[w] -= 1

    def loads(self) -> np.ndarray:
        return self._loads


@dataclass
class Result:
    tpot: np.ndarray
    ttft: np.ndarray
    finish: np.ndarray
    distinct_per_step: float
    steps: int


@dataclass(frozen=True)
class Handoff:
    """Arrival to the decoder's queue: prefill, the counts wait, the decoder handoff and KV transfer."""
    prefill_util: float = 0.7  # prefill servers are sized so they are this busy at the offered load
    counts_s: float = 2e-3  # counts reduction + ZMQ hop + the routing decision
    handoff_s: float = 10e-3  # decoder POST, tokenisation, admission, KV allocation, bootstrap handshake
    kv_s_per_token: float = 20e-6  # KV transfer per prompt token


def prompt_tokens(trace: Trace) -> np.ndarray:
    top_k = trace.decode[0].shape[2]
    return trace.prefill[:, 0, :].sum(axis=1) // top_k


def prefill_seconds(trace: Trace, cost: CostModel) -> np.ndarray:
    """Per trace entry: one prefill forward of its prompt under the step-cost profile."""
    return cost.a + cost.b * prompt_tokens(trace) + cost.c * (trace.prefill > 0).sum(axis=(1, 2))


def prefill_servers(trace: Trace, order: np.ndarray, rate: float, cost: CostModel, handoff: Handoff) -> int:
    mean = float(prefill_seconds(trace, cost)[order].mean())
    return max(1, int(np.ceil(rate * mean / handoff.prefill_util)))


@dataclass(frozen=True)
class Refit:
    interval_s: float
    window_s: float
    min_samples: int | None = None  # None: the load balancer's max(64, 16 per decoder)


class OnlineRefit:
    """The load balancer's periodic refit in simulated time, for a LocalityBandRouter."""

    def __init__(self, router: LocalityBandRouter, cfg: Refit, idf: np.ndarray, mask: np.ndarray, workers: int,
                 seed: int):
        self.router, self.cfg, self.idf, self.mask, self.seed = router, cfg, idf, mask, seed
        self.min_samples = cfg.min_samples if cfg.min_samples is not None else max(64, 16 * workers)
        self.seen: deque[tuple[float, np.ndarray]] = deque()
        self.next_at = cfg.interval_s
        self.fits = 0

    def observe(self, now: float, counts: np.ndarray) -> None:
        self.seen.append((now, counts))
        while len(self.seen) > self.min_samples and self.seen[0][0] < now - self.cfg.window_s:
            self.seen.popleft()  # neither in the window nor among the newest min_samples
        while now >= self.next_at:
            self.next_at += self.cfg.interval_s
            recent = [c for t, c in self.seen if t >= now - self.cfg.window_s]
            if len(recent) < self.min_samples:
                recent = [c for _, c in list(self.seen)[-self.min_samples:]]
            if len(recent) < self.min_samples:
                continue
            sigs = build_signatures(np.stack(recent), self.idf, self.mask)
            sigs = sigs[sigs.any(axis=1)]
            k = self.router.num_workers
            if len(sigs) < k:
                continue
            new, _, _ = fitting.balanced_spherical_kmeans(sigs, k, seed=self.seed + self.fits)
            self.router.swap_centroids(fitting.align_centroids(self.router.centroids(), new))
            self.fits += 1


ARRIVE, STEP_END, PREFILL_END, DECIDE, JOIN = range(5)  # event kinds


@dataclass(frozen=True)
class Step:
    """One simulated decode step: which trace entries ran, at which decode position, what it cost."""
    start: float
    worker: int
    requests: tuple[int, ...]  # trace indices
    positions: tuple[int, ...]  # each request's decode step index
    distinct_pairs: int
    seconds: float


def simulate(trace: Trace, order: np.ndarray, arrivals: np.ndarray, router, workers: int,
             cost: CostModel, max_batch: int, use_counts: bool, lengths: np.ndarray | None = None,
             refit: OnlineRefit | None = None, handoff: Handoff | None = None, prefill_count: int = 1,
             step_log: list[Step] | None = None) -> Result:
    """Event-driven: each decoder's next step end is an event; requests join at step boundaries.
    Request j decodes `lengths[j]` tokens (at most its trace's). Without `handoff`, a request is
    routed and queued on its decoder at arrival (no prefill); with it, it goes through
    `prefill_count` prefill servers and the handoff first. `step_log` collects every decode step."""
    n = len(order)
    length = np.array([len(trace.decode[order[j]]) for j in range(n)])
    if lengths is not None:
        length = np.minimum(length, np.maximum(lengths, 1))
    L, E = trace.prefill.shape[1:]
    queues: list[list[int]] = [[] for _ in range(workers)]  # waiting
    running: list[list[int]] = [[] for _ in range(workers)]
    progress = np.zeros(n, dtype=np.int64)
    first_token = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    worker_of = np.zeros(n, dtype=np.int64)
    ticket_of: dict[int, int] = {}
    busy = [False] * workers
    events: list[tuple[float, int, int]] = []  # (time, kind, request or decoder id)
    for j in range(n):
        heapq.heappush(events, (arrivals[j], ARRIVE, j))
    prefill_s = prefill_seconds(trace, cost)[order] if handoff is not None else None
    tokens = prompt_tokens(trace)[order] if handoff is not None else None
    prefill_free = prefill_count
    prefill_queue: deque[int] = deque()
    distinct_total = 0
    steps = 0
    layer_offset = (np.arange(L) * E)[None, :, None]

    def start_step(w: int, now: float) -> None:
        nonlocal distinct_total, steps
        while queues[w] and len(running[w]) < max_batch:
            running[w].append(queues[w].pop(0))
        if not running[w]:
            busy[w] = False
            return
        ids = np.stack([trace.decode[order[j]][progress[j]] for j in running[w]]).astype(np.int64)
        distinct = len(np.unique(ids + layer_offset))
        distinct_total += distinct
        steps += 1
        busy[w] = True
        dt = cost.a + cost.b * len(running[w]) + cost.c * distinct
        if step_log is not None:
            step_log.append(Step(now, w, tuple(int(order[j]) for j in running[w]),
                                 tuple(int(progress[j]) for j in running[w]), distinct, dt))
        heapq.heappush(events, (now + dt, STEP_END, w))

    def start_prefill(j: int, now: float) -> None:
        assert prefill_s is not None
        heapq.heappush(events, (now + prefill_s[j], PREFILL_END, j))

    while events:
        now, kind, x = heapq.heappop(events)
        if kind == ARRIVE and handoff is not None:
            if prefill_free > 0:
                prefill_free -= 1
                start_prefill(x, now)
            else:
                prefill_queue.append(x)
        elif kind == PREFILL_END:
            assert handoff is not None
            if prefill_queue:
                start_prefill(prefill_queue.popleft(), now)
            else:
                prefill_free += 1
            heapq.heappush(events, (now + handoff.counts_s, DECIDE, x))
        elif kind == JOIN:
            w = int(worker_of[x])
            queues[w].append(x)
            if not busy[w]:
                start_step(w, now)
        elif kind in (ARRIVE, DECIDE):
            j = x
            counts = trace.prefill[order[j]] if use_counts else None
            if refit is not None and counts is not None:
                refit.observe(now, counts)
            if isinstance(router, MarginalCostRouter):
                receipt = router.acquire_with_receipt(counts)
                w, ticket_of[j] = receipt["worker"], receipt["ticket"] or 0
            elif isinstance(router, DomainOracle):
                w = router.acquire_domain(trace.domain[order[j]])
            else:
                w = router.acquire(counts)
            worker_of[j] = w
            if handoff is not None:
                assert tokens is not None
                heapq.heappush(events, (now + handoff.handoff_s + handoff.kv_s_per_token * tokens[j], JOIN, j))
            else:
                queues[w].append(j)
                if not busy[w]:
                    start_step(w, now)
        else:
            w = x
            still = []
            for j in running[w]:
                progress[j] += 1
                if progress[j] == 1:
                    first_token[j] = now
                if progress[j] >= length[j]:
                    finish[j] = now
                    if isinstance(router, MarginalCostRouter):
                        router.release(w, ticket_of.pop(j))  # ids are the indices: no membership changes here
                    else:
                        router.release(w)
                else:
                    still.append(j)
            running[w] = still
            start_step(w, now)
    tpot = (finish - first_token) / np.maximum(length - 1, 1)
    if int(router.loads().sum()) != 0:
        raise AssertionError("router load counters did not return to zero")
    return Result(tpot=tpot, ttft=first_token - arrivals, finish=finish,
                  distinct_per_step=distinct_total / max(steps, 1) / L, steps=steps)


MAX_IMBALANCE: int | None = 2  # set from --max-imbalance
IMBALANCE_FRACTION = 0.0  # set from --imbalance-fraction
MARGINAL_C_SCALE = 1.0  # set from policy_seeds.py --c-scale
MARGINAL_TOLD: tuple[float, float, float] | None = None  # policy_seeds.py --marginal-told: a fixed (a, b, c)
MARGINAL_CAP = True  # --marginal-cap: the marginal router's batch cap is the decoders' max batch
MARGINAL_SHARPNESS = DEFAULT_SHARPNESS  # policy_seeds.py --sharpness: q ∝ counts^γ


def make_router(policy: str, workers: int, calib: Trace, tau: float, seed: int, cost: CostModel,
                max_batch: int | None = None):
    if policy in BASELINES:
        return BaselineRouter(policy, workers, seed=seed)
    if policy == "domain":
        return DomainOracle(workers, calib.domain)
    if policy == "marginal":
        L, E = calib.prefill.shape[1:]
        # The policy is told the cost profile, with its per-expert cost off by MARGINAL_C_SCALE
        # (1: exact) to see how much it depends on knowing it.
        a, b, c = MARGINAL_TOLD or (cost.a, cost.b, cost.c * MARGINAL_C_SCALE)
        return MarginalCostRouter(a, b, c, num_workers=workers, layers=L, experts=E,
                                  top_k=calib.decode[0].shape[2], batch_cap=max_batch if MARGINAL_CAP else None,
                                  sharpness=MARGINAL_SHARPNESS)
    cs = fitting.fit(calib.prefill, workers, top_k=calib.decode[0].shape[2], seed=seed)
    router = LocalityBandRouter(cs.centroids, tau, idf=cs.idf, layer_mask=cs.layer_mask, max_imbalance=MAX_IMBALANCE,
                                imbalance_fraction=IMBALANCE_FRACTION)
    if REFIT is not None:
        return router, OnlineRefit(router, REFIT, cs.idf, cs.layer_mask, workers, seed)
    return router


LENGTHS = "lognormal:48,0.8"  # set from --lengths
REFIT: Refit | None = None  # set from --refit
HANDOFF: Handoff | None = Handoff()  # set from --handoff


def draw_lengths(rng: np.random.Generator, n: int, spec: str = "") -> np.ndarray | None:
    """`trace`: every request its whole trace; `lognormal:MEDIAN,SIGMA`: a lognormal draw, at least 2."""
    spec = spec or LENGTHS
    if spec == "trace":
        return None
    kind, _, params = spec.partition(":")
    if kind != "lognormal":
        raise SystemExit(f"--lengths: expected trace or lognormal:MEDIAN,SIGMA, got {spec!r}")
    median, sigma = (float(x) for x in params.split(","))
    return np.maximum(np.round(rng.lognormal(np.log(median), sigma, n)), 2).astype(np.int64)


def capacity_rate(trace: Trace, workers: int, cost: CostModel, max_batch: int, seed: int = 0) -> float:
    """Saturation throughput (requests/s) of the best load-only baseline: every request queued at
    t = 0, completions per second over the middle of the run (the queue never empties there)."""
    rng = np.random.default_rng(seed + 7919)
    n = max(200, 12 * max_batch * workers)
    order = rng.integers(0, len(trace.decode), n)
    lengths = draw_lengths(rng, n)
    best = 0.0
    for policy in BASELINES:
        res = simulate(trace, order, np.zeros(n), BaselineRouter(policy, workers, seed=seed), workers, cost, max_batch,
                       use_counts=False, lengths=lengths)
        done = np.sort(res.finish)
        lo, hi = done[n // 4], done[3 * n // 4]
        best = max(best, (3 * n // 4 - n // 4) / max(hi - lo, 1e-12))
    return best


def run_cell(trace: Trace, calib: Trace, workers: int, tau: float, load: float, cost: CostModel,
             max_batch: int, n_requests: int, seed: int, policies: tuple[str, ...] = POLICIES,
             capacity: float | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    rate = load * (capacity if capacity is not None else capacity_rate(trace, workers, cost, max_batch, seed))
    order = rng.integers(0, len(trace.decode), n_requests)
    arrivals = np.cumsum(rng.exponential(1 / rate, n_requests))
    lengths = draw_lengths(rng, n_requests)
    prefill_count = prefill_servers(trace, order, rate, cost, HANDOFF) if HANDOFF is not None else 0
    out = []
    for policy in policies:
        router = make_router(policy, workers, calib, tau, seed, cost, max_batch)
        refit = None
        if isinstance(router, tuple):  # eldr with the online refit
            router, refit = router
        res = simulate(trace, order, arrivals, router, workers, cost, max_batch,
                       use_counts=policy in COUNTS_POLICIES, lengths=lengths, refit=refit, handoff=HANDOFF,
                       prefill_count=prefill_count)
        warm = n_requests // 10  # drop warm-up
        t = res.tpot[warm:]
        ttft = res.ttft[warm:]
        out.append({"policy": policy, "workers": workers, "tau": tau, "load": load, "rate": round(rate, 3),
                    "cost": cost.name, "tpot_p50_ms": float(np.percentile(t, 50) * 1e3),
                    "tpot_p99_ms": float(np.percentile(t, 99) * 1e3),
                    "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
                    "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3), "prefill_servers": prefill_count,
                    "distinct_experts_per_layer_step": res.distinct_per_step,
                    "refits": refit.fits if refit is not None else 0})
    return out


def summarize(rows: list[dict]) -> list[str]:
    lines = []
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["cost"], r["workers"], r["tau"], r["load"]), {})[r["policy"]] = r
    lines.append(f"{'cost':>12} {'W':>5} {'tau':>5} {'load':>5} {'policy':>8} | {'p50':>9} {'best base':>10} {'Δp50':>7} | "
                 f"{'p99':>9} {'best base':>10} {'Δp99':>7} | {'experts vs jsq':>16}")
    for (cost, w, tau, load), cell in sorted(cells.items()):
        b50 = min(cell[p]["tpot_p50_ms"] for p in BASELINES)
        b99 = min(cell[p]["tpot_p99_ms"] for p in BASELINES)
        jsq = cell["jsq"]["distinct_experts_per_layer_step"]
        for name in (p for p in REPORTED if p in cell):
            e = cell[name]
            lines.append(
                f"{cost:>12} {w:>5} {tau:>5} {load:>5} {name:>8} | {e['tpot_p50_ms']:>8.2f}m {b50:>9.2f}m "
                f"{100 * (e['tpot_p50_ms'] / b50 - 1):>+6.1f}% | {e['tpot_p99_ms']:>8.2f}m {b99:>9.2f}m "
                f"{100 * (e['tpot_p99_ms'] / b99 - 1):>+6.1f}% | {e['distinct_experts_per_layer_step']:>6.1f}/{jsq:<6.1f}"
                f" {100 * (e['distinct_experts_per_layer_step'] / jsq - 1):+.0f}%"
            )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau0 = sorted({r["tau"] for r in rows})
    tau = 0.1 if 0.1 in tau0 else tau0[0]
    sel = [r for r in rows if r["tau"] == tau and r["load"] == max(r2["load"] for r2 in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("tpot_p50_ms", "tpot_p99_ms")):
        for policy in POLICIES:
            pts = sorted((r["workers"], r[key]) for r in sel if r["policy"] == policy and r["cost"] == sel[0]["cost"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoders")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"simulated TPOT vs decoders (tau={tau}, cost={sel[0]['cost']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """Options of the simulated system shared with bench/policy_seeds.py."""
    ap.add_argument("--lengths", default="lognormal:48,0.8",
                    help="decode lengths: trace (every request its whole trace) or lognormal:MEDIAN,SIGMA, cut at "
                         "the trace's length (default: %(default)s, assumed)")
    ap.add_argument("--refit", default="2.5,5",
                    help="eldr: online refit INTERVAL,WINDOW in simulated seconds, as the load balancer's "
                         "--refit-interval/--refit-window (default: %(default)s), or off")
    ap.add_argument("--max-imbalance", type=int, default=2,
                    help="eldr starvation guard, as the load balancer's --max-imbalance (default 2; -1 = off)")
    ap.add_argument("--imbalance-fraction", type=float, default=0.0,
                    help="eldr relative guard, as the load balancer's --imbalance-fraction (default 0: absolute)")
    ap.add_argument("--marginal-cap", choices=("batch", "off"), default="batch",
                    help="marginal: its batch cap (the load balancer's --batch-cap) is the decoders' --max-batch, "
                         "or off (default: %(default)s)")
    d = Handoff()
    ap.add_argument("--handoff", default=f"{d.prefill_util},{d.counts_s * 1e3:g},{d.handoff_s * 1e3:g},"
                                         f"{d.kv_s_per_token * 1e6:g}",
                    metavar="UTIL,COUNTS_MS,HANDOFF_MS,KV_US_PER_TOKEN",
                    help="prefill and handoff before decode (assumed): prefill servers sized to UTIL busy, the "
                         "counts wait, the decoder handoff, the KV transfer per prompt token (default: "
                         "%(default)s), or off (no prefill: routed at arrival, no TTFT)")


def configure(args: argparse.Namespace) -> None:
    global LENGTHS, REFIT, HANDOFF, MAX_IMBALANCE, IMBALANCE_FRACTION, MARGINAL_CAP
    LENGTHS = args.lengths
    MARGINAL_CAP = args.marginal_cap == "batch"
    MAX_IMBALANCE = None if args.max_imbalance < 0 else args.max_imbalance
    IMBALANCE_FRACTION = args.imbalance_fraction
    if args.handoff == "off":
        HANDOFF = None
    else:
        try:
            util, counts_ms, handoff_ms, kv_us = (float(x) for x in args.handoff.split(","))
        except ValueError:
            raise SystemExit(f"--handoff: expected UTIL,COUNTS_MS,HANDOFF_MS,KV_US_PER_TOKEN or off, "
                             f"got {args.handoff!r}") from None
        if not 0 < util <= 1 or min(counts_ms, handoff_ms, kv_us) < 0:
            raise SystemExit(f"--handoff: UTIL must be in (0, 1] and the times ≥ 0, got {args.handoff!r}")
        HANDOFF = Handoff(util, counts_ms * 1e-3, handoff_ms * 1e-3, kv_us * 1e-6)
    draw_lengths(np.random.default_rng(0), 1)  # refuses a bad spec before any work
    if args.refit == "off":
        REFIT = None
    else:
        try:
            interval, window = (float(x) for x in args.refit.split(","))
        except ValueError:
            raise SystemExit(f"--refit: expected INTERVAL,WINDOW or off, got {args.refit!r}") from None
        REFIT = Refit(interval, window)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--traces", type=Path, default=None, help="npz from bench/record_traces.py")
    src.add_argument("--synthetic", action="store_true", help="synthetic domain traces")
    ap.add_argument("--correlation", type=float, default=0.8, help="synthetic prefill->decode correlation")
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 16, 24, 64, 256, 1024])
    ap.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--load", type=float, nargs="+", default=[0.6, 0.85], help="offered load vs capacity")
    ap.add_argument("--cost", nargs="+", default=["cpu-inflated", "paper"], choices=COSTS)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--requests-per-worker", type=int, default=40)
    add_model_options(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sweep for CI smoke tests")
    ap.add_argument("--out", type=Path, default=Path("bench/results/simulate_sweep.json"),
                    help="one seed per cell over a wide sweep (default: %(default)s; bench/policy_seeds.py writes the "
                         "20-seed records to bench/results/simulate.json)")
    args = ap.parse_args(argv)
    configure(args)
    if args.quick:
        args.workers, args.tau, args.load, args.cost, args.requests_per_worker = [8, 16], [0.1], [0.85], ["cpu-small"], 20
    if args.traces is None and not args.synthetic:
        default = Path("bench/results/traces_tiny_moe.npz")
        if default.exists():
            args.traces = default
        else:
            args.synthetic = True
    if args.synthetic:
        full = synthetic_traces(600, 6, 4, 64, 4, 48, args.correlation, args.seed)
        source = f"synthetic (6 domains, 4x64 top-4, correlation {args.correlation})"
    else:
        full = load_traces(args.traces)
        source = str(args.traces)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(full.decode))
    half = len(perm) // 2
    pick = lambda idx: Trace(full.domain[idx], full.prefill[idx], [full.decode[i] for i in idx], full.experts)
    calib, evalset = pick(perm[:half]), pick(perm[half:])
    started = time.perf_counter()
    rows: list[dict] = []
    layers, experts = full.prefill.shape[1:]
    costs = {name: cost_model(name, layers, experts) for name in args.cost}
    for cost in args.cost:
        for w in args.workers:
            capacity = capacity_rate(full, w, costs[cost], args.max_batch, args.seed)
            for tau in args.tau:
                for load in args.load:
                    rows.extend(run_cell(evalset, calib, w, tau, load, costs[cost], args.max_batch,
                                         max(200, args.requests_per_worker * w), args.seed, capacity=capacity))
    for line in summarize(rows):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"traces": source, "costs": {c: costs[c].__dict__ for c in args.cost}, "max_batch": args.max_batch,
            "lengths": LENGTHS, "refit": REFIT.__dict__ if REFIT else None,
            "handoff": HANDOFF.__dict__ if HANDOFF else None, "marginal_cap": MARGINAL_CAP, "seconds": round(time.perf_counter() - started, 1)}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"\n{len(rows)} rows in {meta['seconds']} s from {source} -> {args.out} (+ .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
