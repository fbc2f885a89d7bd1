"""Interleaved, request-paired TTFT measurement across routes (issue 12).

Running one route after another leaves every comparison at the mercy of this shared machine's
state, which drifts between runs by more than the effect being measured (RESULTS.md §7: one arm's
TTFT p50 ranged 2-7x between repeats). Here the routes run *at once*, on the same prompts: each
prompt is sent once to every route, in a random order, as consecutive arrivals of one Poisson stream
(or, with rate 0, one group after another on a closed loop). A slow minute of the machine then lands
on every route alike, so it cancels in the paired ratio instead of widening it. Routes that share
servers add up their rates there, so open-loop comparisons are fair only between routes on servers
of their own (stock-smg against one eldr route); one request at a time, any routes compare.

Each request is timed by SGLang's own client code (`sglang.benchmark.serving`'s streaming /generate
request function), so TTFT, TPOT and ITL mean here what they mean in that tool.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from intervals import repeat_ratios, t_interval

# Options the client's request function reads from its module's global `args`: the values
# `python -m sglang.benchmark.serving --backend sglang` runs with by default (greedy, EOS ignored,
# streaming, no logprobs).
CLIENT_ARGS = dict(temperature=0.0, disable_ignore_eos=False, top_p=1.0, disable_stream=False, return_logprob=False,
                   return_routed_experts=False, logprob_start_len=-1, top_logprobs_num=0, token_ids_logprob=None,
                   cache_report=False)


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int


def load_prompts(path: Path, model: Path, n: int, seed: int, routes: list[str]) -> list[dict[str, Prompt]]:
    """`n` held-out texts (drawn with replacement when there are fewer), each in the model's chat template
    once per route. Each route's copy opens with a system line of its own (its index), so two routes on
    the same servers never reuse each other's prefix from the radix cache, while every copy has the
    same length."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    picked = rng.sample(texts, n) if n <= len(texts) else [rng.choice(texts) for _ in range(n)]
    out = []
    for t in picked:
        group = {}
        for k, route in enumerate(routes):
            chat = tok.apply_chat_template([{"role": "system", "content": str(k)}, {"role": "user", "content": t}],
                                           tokenize=False, add_generation_prompt=True)
            group[route] = Prompt(chat, len(tok(chat)["input_ids"]))
        out.append(group)
    return out


def schedule(routes: list[str], groups: int, seed: int) -> list[tuple[int, str]]:
    """Arrival order: each group (one prompt) once per route, the routes of a group in a random order."""
    rng = random.Random(seed)
    order = []
    for g in range(groups):
        rs = list(routes)
        rng.shuffle(rs)
        order += [(g, r) for r in rs]
    return order


async def _run(urls: dict[str, str], prompts: list[dict[str, Prompt]], rate_per_route: float, output_len: int,
               concurrency: int, seed: int, model: Path) -> list[dict]:
    from sglang.benchmark import serving

    serving.set_global_args(argparse.Namespace(**CLIENT_ARGS))
    order = schedule(list(urls), len(prompts), seed)
    rng = np.random.default_rng(seed)
    total_rate = rate_per_route * len(urls)
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int, group: int, route: str) -> dict:
        p = prompts[group][route]
        inp = serving.RequestFuncInput(prompt=p.text, api_url=urls[route] + "/generate", prompt_len=p.tokens,
                                       output_len=output_len, model=str(model), lora_name="", image_data=None,
                                       extra_request_body={})
        async with gate:
            sent = time.perf_counter() - t0
            out = await serving.async_request_sglang_generate(inp)
        tpot = (out.latency - out.ttft) / (out.output_len - 1) if out.success and out.output_len > 1 else None
        return {"route": route, "group": group, "seq": i, "prompt_tokens": p.tokens, "sent_s": round(sent, 4),
                "success": out.success,
                "error": out.error[-300:], "ttft_ms": round(out.ttft * 1e3, 3), "e2e_ms": round(out.latency * 1e3, 3),
                "tpot_ms": None if tpot is None else round(tpot * 1e3, 4), "output_len": out.output_len,
                "itl_p50_ms": round(float(np.median(out.itl)) * 1e3, 4) if out.itl else None}

    tasks = []
    due = 0.0
    for i, (group, route) in enumerate(order):
        if total_rate > 0:  # open loop: Poisson arrivals
            due += float(rng.exponential(1.0 / total_rate))
            await asyncio.sleep(max(0.0, due - (time.perf_counter() - t0)))
        tasks.append(asyncio.create_task(one(i, group, route)))
        if total_rate <= 0:  # closed loop: the semaphore paces; yield so the task takes its slot in order
            await asyncio.sleep(0)
    return list(await asyncio.gather(*tasks))


def run_interleaved(urls: dict[str, str], prompts: list[dict[str, Prompt]], rate_per_route: float, output_len: int,
                    concurrency: int, seed: int, model: Path) -> list[dict]:
    """One interleaved run: every prompt through every route. `rate_per_route` 0 means a closed loop
    with `concurrency` requests in flight (1: one request at a time, each route's bare path)."""
    return asyncio.run(_run(urls, prompts, rate_per_route, output_len, concurrency, seed, model))


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else float("nan")


def run_summary(requests: list[dict], route: str) -> dict:
    """One route's figures in one run, named as in ttft_vs_stock's records."""
    rs = [r for r in requests if r["route"] == route and r["success"]]
    ttft = [r["ttft_ms"] for r in rs]
    tpot = [r["tpot_ms"] for r in rs if r["tpot_ms"] is not None]
    span = max((r["sent_s"] + r["e2e_ms"] / 1e3 for r in rs), default=0.0) - min((r["sent_s"] for r in rs), default=0.0)
    return {"ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
            "e2e_p50_ms": percentile([r["e2e_ms"] for r in rs], 50),
            "output_tok_s": sum(r["output_len"] for r in rs) / span if span > 0 else float("nan"),
            "completed": len(rs), "num_prompts": len([r for r in requests if r["route"] == route])}


def pair_bootstrap(requests: list[dict], route: str, vs: str, metric: str, q: float, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """Ratio of the q-th percentile of `metric` (pooled over runs) for `route` over `vs`, with a 95 %
    percentile-bootstrap interval that resamples prompt groups within each run (a group's requests to
    the two routes stay together)."""
    by_run: dict[int, dict[int, dict[str, float]]] = {}
    for r in requests:
        if r["success"] and r[metric] is not None and r["route"] in (route, vs):
            by_run.setdefault(r["repeat"], {}).setdefault(r["group"], {})[r["route"]] = r[metric]
    cells = [np.array([[g[route], g[vs]] for g in run.values() if route in g and vs in g]) for run in by_run.values()]
    cells = [c for c in cells if len(c)]
    if not cells:
        return float("nan"), float("nan"), float("nan")
    pooled = np.concatenate(cells)
    point = float(np.percentile(pooled[:, 0], q) / np.percentile(pooled[:, 1], q))
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        s = np.concatenate([c[rng.integers(0, len(c), len(c))] for c in cells])
        boots[b] = np.percentile(s[:, 0], q) / np.percentile(s[:, 1], q)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


# Run metrics that are a percentile of a per-request field: those get the group bootstrap as well.
PER_REQUEST = {"ttft_p50_ms": ("ttft_ms", 50.0), "ttft_p99_ms": ("ttft_ms", 99.0), "tpot_p50_ms": ("tpot_ms", 50.0),
               "tpot_p99_ms": ("tpot_ms", 99.0), "e2e_p50_ms": ("e2e_ms", 50.0)}


def paired_ratios(runs: list[dict], requests: list[dict], pairs: list[tuple[str, str]], metrics: list[str]) -> list[dict]:
    """Per (rate, route, baseline, metric): the t-interval of the per-run ratio (the verdict; runs are
    the independent units) and, beside it, the pooled ratio with its group bootstrap."""
    out = []
    for rate in sorted({r["rate"] for r in runs}):
        same = [r for r in runs if r["rate"] == rate]
        reqs = [r for r in requests if r["rate"] == rate]
        for route, vs in pairs:
            for metric in metrics:
                ratios = repeat_ratios(same, route, vs, metric)
                if not ratios:
                    continue
                m, lo, hi = t_interval(ratios)
                row = {"rate": rate, "route": route, "vs": vs, "metric": metric, "n_runs": len(ratios),
                       "ratio_mean": m, "ci95_low": lo, "ci95_high": hi}
                if metric in PER_REQUEST:
                    p, blo, bhi = pair_bootstrap(reqs, route, vs, *PER_REQUEST[metric])
                    row |= {"pooled_ratio": p, "boot95_low": blo, "boot95_high": bhi}
                out.append(row)
    return out


def plot(requests: list[dict], path: Path) -> None:
    """TTFT distribution per route, pooled over runs, one panel per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in requests})
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        routes = sorted({r["route"] for r in requests if r["rate"] == rate})
        for i, route in enumerate(routes):
            xs = np.sort([r["ttft_ms"] for r in requests if r["rate"] == rate and r["route"] == route and r["success"]])
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), color=f"C{i}", label=f"{route} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT ms (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("one request at a time" if rate == 0 else f"{rate:g} req/s per route, interleaved")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
