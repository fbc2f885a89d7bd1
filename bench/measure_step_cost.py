"""Measures how a CPU decode step's MoE time grows with the number of distinct experts the batch
activates, on this machine, with the tiny model's expert shape and SGLang's native CPU MoE path
(a loop over the active experts: gather tokens, gate/up, SiLU, down, scatter-add).

Fits per-layer time = a + b·tokens + c·distinct by least squares and writes
bench/results/step_cost.json; bench/simulate.py's "cpu" profile uses these coefficients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-qwen3-moe")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("bench/results/step_cost.json"))
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    experts, top_k = cfg.get("num_experts") or cfg["num_local_experts"], cfg["num_experts_per_tok"]
    layers = cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(experts, hidden, inter, generator=g, dtype=torch.bfloat16) * 0.02

    def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            h = x[tok] @ w13[e].t()
            gate, up = h.chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w2[e].t()
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out

    rng = np.random.default_rng(0)
    rows = []
    for tokens in (1, 4, 8, 16, 32):
        for distinct in sorted({min(experts, d) for d in (top_k, 8, 16, 24, 32, 48, 64) if d >= top_k}):
            if distinct > tokens * top_k:
                continue
            pool = rng.choice(experts, distinct, replace=False)
            ids = np.stack([rng.choice(pool, top_k, replace=False) for _ in range(tokens)])
            ids[:, 0] = np.resize(pool, tokens)  # every pooled expert is used at least once
            ids = torch.tensor(ids)
            x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
            w = torch.full((tokens, top_k), 1.0 / top_k)
            for _ in range(3):
                moe(x, ids, w)
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                moe(x, ids, w)
                ts.append(time.perf_counter() - t)
            rows.append((tokens, len(torch.unique(ids)), float(np.median(ts))))
    a_mat = np.array([[1.0, t, d] for t, d, _ in rows])
    y = np.array([s for _, _, s in rows])
    (a, b, c), *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    pred = a_mat @ np.array([a, b, c])
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    per16, per64 = a + b * 16 + c * min(16, experts), a + b * 16 + c * min(64, experts)
    result = {
        "machine": "this CPU, 1 thread, torch " + torch.__version__,
        "expert_shape": {"hidden": hidden, "moe_intermediate": inter, "experts": experts, "top_k": top_k, "layers": layers},
        "per_layer_fit_seconds": {"a": a, "b_per_token": b, "c_per_distinct_expert": c, "r2": r2},
        "step_fit_seconds": {"a": a * layers, "b_per_token": b * layers, "c_per_distinct_layer_expert": c},
        "ratio_16_tokens_64_vs_16_experts": per64 / per16,
        "samples": [{"tokens": t, "distinct": d, "seconds": s} for t, d, s in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"per MoE layer: {a * 1e6:.1f} µs + {b * 1e6:.2f} µs/token + {c * 1e6:.2f} µs/distinct expert (R² {r2:.3f})")
    print(f"16 tokens: 64 vs 16 distinct experts -> ×{per64 / per16:.2f} MoE-layer time; -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
