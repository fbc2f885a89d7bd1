"""Paired A/B of two builds of the router's decision loop (`router_check latency`).

This shared machine is bimodal: the same binary gives 4.7 or 6.6 µs at W = 16 from one run to
the next (RESULTS.md §1), so figures of two builds taken minutes apart do not compare. Here the two
binaries alternate, in a random order within each alternation, and each point's per-alternation
ratio new / base of its p50 gets two verdicts: the mean's 95 % t-interval, and the median's 95 %
order-statistic interval. The second holds up where the machine switches speed between the two
halves of a pair (the ratio is then off by about 1.45 either way, which swamps a t-interval).
Run long alternations for it (ROUTER_CHECK_REPEAT=10, --alternations 40).

    cargo build --release -p eldr-router --example router_check   # once per build, then copy it
    python bench/router_ab.py --base /tmp/rc_base --new /tmp/rc_new --workers 16 1024 --out X.json

Two precisions of one build: --base B --new B --mode int16 --new-mode int8.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intervals import median_interval, t_interval  # noqa: E402
from native_flags import alternate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="router_check binary of the base build")
    ap.add_argument("--new", type=Path, required=True, help="router_check binary of the build under test")
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 1024])
    modes = ["certified", "exact", "int8", "int16"]
    ap.add_argument("--mode", default="certified", choices=modes)
    ap.add_argument("--new-mode", choices=modes,
                    help="the new side's mode, to compare two precisions of one build (default: --mode)")
    ap.add_argument("--metric", default="p50_us", choices=["p50_us", "receipt_p50_us"],
                    help="select's p50 (loads i mod 5) or the receipt's (every load equal)")
    ap.add_argument("--alternations", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    mode = {"base": args.mode, "new": args.new_mode or args.mode}
    sides = {"base": args.base, "new": args.new}
    sweeps = {str(w): alternate(sides, args.alternations, args.seed + w, str(w), extra={k: (v,) for k, v in mode.items()})
              for w in args.workers}
    # Per build, per alternation: the metric (µs) per (W, L, E) of that side's mode.
    runs = {build: [{(r["workers"], r["layers"], r["experts"]): r[args.metric]
                     for w in args.workers for r in sweeps[str(w)][build][i] if r["mode"] == mode[build]}
                    for i in range(args.alternations)] for build in ("base", "new")}
    rows = []
    for key in runs["base"][0]:
        base = [r[key] for r in runs["base"]]
        new = [r[key] for r in runs["new"]]
        ratios = [n / b for n, b in zip(new, base)]
        m, lo, hi = t_interval(ratios)
        med, mlo, mhi = median_interval(ratios)
        rows.append({"workers": key[0], "layers": key[1], "experts": key[2], "base_p50_us": base, "new_p50_us": new,
                     "ratio_mean": m, "ci95_low": lo, "ci95_high": hi,
                     "ratio_median": med, "median_ci95_low": mlo, "median_ci95_high": mhi})
        verdict = "faster" if hi < 1 else "slower" if lo > 1 else "unresolved"
        mverdict = "faster" if mhi < 1 else "slower" if mlo > 1 else "unresolved"
        print(f"W={key[0]:>5} ({key[1]},{key[2]}): base {min(base):8.2f}-{max(base):8.2f} µs  new {min(new):8.2f}-"
              f"{max(new):8.2f} µs  ratio {m:.3f} [{lo:.3f}, {hi:.3f}] {verdict}; "
              f"median {med:.3f} [{mlo:.3f}, {mhi:.3f}] {mverdict}")
    args.out.write_text(json.dumps({"base": str(args.base), "new": str(args.new), "mode": args.mode,
                                    "new_mode": mode["new"], "metric": args.metric,
                                    "alternations": args.alternations, "points": rows}, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
