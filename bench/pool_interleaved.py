"""Pools the interleaved runs of several `ttft_vs_stock.py --interleave` files (issue 12).

Each run of an interleaved file is one independent paired comparison, so runs of different days
and seeds pool as long as the request path is the same: the verdict is the 95 % t-interval of the
per-run ratio over all of them. Each file's own interval is printed beside it, so a day that
disagrees with the others shows.

    python bench/pool_interleaved.py --rate 1 --out bench/results/pooled.json A.json B.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intervals import repeat_ratios, t_interval  # noqa: E402

METRICS = ["ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s"]


def cell(ratios: list[float]) -> dict:
    m, lo, hi = t_interval(ratios)
    return {"n_runs": len(ratios), "mean": round(m, 4), "ci95_low": round(lo, 4), "ci95_high": round(hi, 4)}


def pool(files: list[Path], rate: float, route: str, vs: str) -> dict:
    """Per metric: each file's per-run ratio interval and the interval over all their runs."""
    out: dict[str, dict] = {}
    for metric in METRICS:
        per_file, every = {}, []
        for path in files:
            runs = [r for r in json.loads(path.read_text())["runs"] if r["rate"] == rate]
            ratios = repeat_ratios(runs, route, vs, metric)
            if ratios:
                per_file[path.name] = cell(ratios)
                every += ratios
        if every:
            out[metric] = {**per_file, "all": cell(every)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+", help="interleaved result files (ttft_vs_stock.py --interleave-out)")
    ap.add_argument("--rate", type=float, required=True, help="the cell to pool: req/s per route, 0 = one at a time")
    ap.add_argument("--route", default="eldr-router-eldr")
    ap.add_argument("--vs", default="stock-smg")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    ratios = pool(args.files, args.rate, args.route, args.vs)
    if not ratios:
        ap.error(f"no runs at rate {args.rate:g} with both {args.route} and {args.vs} in these files")
    for metric, cells in ratios.items():
        parts = [f"{name}: {c['mean']:.3f} [{c['ci95_low']:.3f}, {c['ci95_high']:.3f}] ({c['n_runs']})"
                 for name, c in cells.items()]
        print(f"{metric:>12}  " + "  |  ".join(parts))
    args.out.write_text(json.dumps({
        "what": f"per-run paired ratio {args.route} / {args.vs} at rate {args.rate:g} "
                "(bench/ttft_vs_stock.py --interleave), 95 % t-intervals over runs, per file and over all",
        "files": [str(f) for f in args.files], "rate": args.rate, "ratios": ratios}, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
