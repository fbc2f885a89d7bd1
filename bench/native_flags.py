"""Generic build vs `-C target-cpu=native` build of the router core, side by side.

Builds the `router_check` example twice (separate target directories), runs their latency sweeps
interleaved in alternating order, and compares each configuration's p50 across repeats (median
and fastest). The kernels are explicit intrinsics chosen at run time, so the native build must
not be slower: exits 1 if a certified configuration of at most 256 decoders has its fastest p50
slower than `--tolerance` × the generic build's (on this shared machine a run is now and then a
third slower for either binary, and noise only adds time, so the fastest of the repeats is what
each build can do; the 17× slowdown this gate exists for shows in every run; 1024 decoders
stream their table from L3, and their p50 moves by ±40 % between runs of the same binary, so
they are reported, not gated). Writes
`bench/results/native_flags.json`. Standard library only (runs before the venv exists).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILDS = {"generic": "", "native": "-C target-cpu=native"}


def build(name: str, flags: str) -> Path:
    target = ROOT / "target" / f"flags-{name}"
    env = dict(os.environ, RUSTFLAGS=flags)
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "eldr-router", "--example", "router_check",
                    "--target-dir", str(target)], cwd=ROOT, env=env, check=True)
    return target / "release" / "examples" / "router_check"


def sweep(binary: Path, *args: str) -> list[dict]:
    """The JSON lines of one `router_check latency [ARGS]` run."""
    out = subprocess.run([str(binary), "latency", *args], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def alternate(binaries: dict[str, Path], repeats: int, seed: int, *args: str,
              extra: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[list[dict]]]:
    """`repeats` sweeps of every binary, in a random order within each repeat, so the machine's
    drift falls on every build alike: per build, one list of JSON lines per repeat. `extra`: more
    arguments for some of them (each side's mode, where one binary runs twice)."""
    runs: dict[str, list[list[dict]]] = {name: [] for name in binaries}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(binaries)
        rng.shuffle(order)
        for name in order:
            runs[name].append(sweep(binaries[name], *args, *(extra or {}).get(name, ())))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs per build (default: 5)")
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--tolerance", type=float, default=1.3,
                    help="largest native/generic ratio of the fastest p50s accepted for the certified kernel "
                         "(default: 1.3)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/native_flags.json")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    binaries = {name: build(name, flags) for name, flags in BUILDS.items()}
    runs = alternate(binaries, repeats, 0)
    records, worst = [], 0.0
    print(f"{'mode':9} {'W':>5} {'L':>3} {'E':>4}  {'generic p50 µs':>14} {'native p50 µs':>14} {'ratio':>6}"
          f"  {'fastest':>7}")
    for i, cell in enumerate(runs["generic"][0]):
        p50 = {name: statistics.median(r[i]["p50_us"] for r in runs[name]) for name in BUILDS}
        best = {name: min(r[i]["p50_us"] for r in runs[name]) for name in BUILDS}
        ratio, fastest = p50["native"] / p50["generic"], best["native"] / best["generic"]
        if cell["mode"] == "certified" and cell["workers"] <= 256:
            worst = max(worst, fastest)
        records.append({k: cell[k] for k in ("mode", "kernel", "workers", "layers", "experts")}
                       | {"generic_p50_us": p50["generic"], "native_p50_us": p50["native"], "ratio": round(ratio, 3),
                          "generic_fastest_p50_us": best["generic"], "native_fastest_p50_us": best["native"],
                          "fastest_ratio": round(fastest, 3), "repeats": repeats})
        print(f"{cell['mode']:9} {cell['workers']:5} {cell['layers']:3} {cell['experts']:4}  "
              f"{p50['generic']:14.2f} {p50['native']:14.2f} {ratio:6.2f}  {fastest:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    verdict = "ok" if worst <= args.tolerance else "SLOWER"
    print(f"native/generic worst certified ratio of the fastest p50s up to 256 decoders {worst:.2f} "
          f"(tolerance {args.tolerance}): {verdict}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
