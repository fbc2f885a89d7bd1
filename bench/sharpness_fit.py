"""How well a request's prefill counts, raised to the sharpness γ, predict its decode tokens' experts.

The marginal policy models request r's decode tokens as picking expert e at layer l with probability
q ∝ counts[l, e]^γ (RESULTS.md §5d). This scores that model on the recorded traces: the mean log
probability of each recorded decode choice under q (smoothed with 2 % of a uniform pick, so an expert
the prompt never used does not score −∞), per γ. The policy only ranks decoders by expected overlap,
so the best-calibrated γ need not be the one that routes best; the simulator decides that.

    python bench/sharpness_fit.py --out bench/results/sharpness_fit.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOOTH = 0.02


def log_likelihood(trace: simulate.Trace, gamma: float, tokens: int) -> float:
    """Mean log probability of the first `tokens` decode choices of every request."""
    _, layers, experts = trace.prefill.shape
    total, n = 0.0, 0
    for counts, decode in zip(trace.prefill.astype(np.float64), trace.decode):
        w = counts**gamma
        q = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        q = (1 - SMOOTH) * q + SMOOTH / experts
        picks = decode[:tokens]  # [T, layers, top_k]
        total += float(np.log(q[np.arange(layers)[None, :, None], picks]).sum())
        n += picks.size
    return total / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=ROOT / "bench" / "results" / "traces_tiny_moe.npz")
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens scored per request (the median length)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    trace = simulate.load_traces(args.traces)
    rows = [{"gamma": g, "mean_log_prob": log_likelihood(trace, g, args.tokens)} for g in args.gammas]
    for r in rows:
        print(f"gamma {r['gamma']:>4g}: mean log probability per decode choice {r['mean_log_prob']:.4f}")
    args.out.write_text(json.dumps({"traces": str(args.traces), "tokens": args.tokens, "smooth": SMOOTH,
                                    "requests": len(trace.decode), "rows": rows}, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
