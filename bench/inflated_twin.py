"""Writes the *inflated twin* of a Qwen3-MoE checkpoint: every expert's intermediate size
zero-padded (default 8192), so the MoE weights no longer fit in the CPU's caches while the function
and the routing stay those of the original. For the tiny model that is 6 MiB per expert and 1.5 GiB
of expert weights, three times this machine's 480 MiB L3 (a 2048 pad, 400 MiB, would still fit).

Why zero padding is exact: an expert computes down(silu(gate·x) ⊙ up·x). Padded gate and up rows
are zero, so their outputs are 0 and silu(0)·0 = 0; the padded down columns are zero as well, so
the extra terms of the down projection add exact zeros. The router (mlp.gate) is untouched, so
every token picks the same experts. Only the bytes a decode step must read grow:
3 · hidden · intermediate · 2 bytes per expert (48 KiB -> 6 MiB for the tiny model).

    python bench/inflated_twin.py [--src models/tiny-qwen3-moe] [--dst models/tiny-qwen3-moe-inflated]

The output is rebuilt only when the source checkpoint or the size changed (see inflated.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "models" / "tiny-qwen3-moe"
DST = ROOT / "models" / "tiny-qwen3-moe-inflated"
STAMP = "inflated.json"
EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inflate(src: Path = SRC, dst: Path = DST, intermediate: int = 8192) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    old = int(cfg["moe_intermediate_size"])
    if intermediate < old:
        raise SystemExit(f"--intermediate {intermediate} is below the source's moe_intermediate_size {old}")
    weights = sorted(src.glob("*.safetensors"))
    if len(weights) != 1:
        raise SystemExit(f"{src}: expected one .safetensors file, found {len(weights)}")
    stamp = {"source": str(src), "source_sha256": _digest(weights[0]), "moe_intermediate_size": intermediate,
             "original_moe_intermediate_size": old}
    if (dst / STAMP).exists() and json.loads((dst / STAMP).read_text()) == stamp:
        return dst

    tensors = load_file(str(weights[0]))
    padded = 0
    for name, t in tensors.items():
        m = EXPERT.search(name)
        if m is None:
            continue
        if m.group(1) == "down_proj":  # [hidden, intermediate]: zero columns
            out = torch.zeros((t.shape[0], intermediate), dtype=t.dtype)
            out[:, :old] = t
        else:  # gate/up [intermediate, hidden]: zero rows
            out = torch.zeros((intermediate, t.shape[1]), dtype=t.dtype)
            out[:old] = t
        tensors[name] = out
        padded += 1
    if padded == 0:
        raise SystemExit(f"{src}: no per-expert gate/up/down weights found (not a Qwen3-MoE checkpoint?)")

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    cfg["moe_intermediate_size"] = intermediate
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(tmp / weights[0].name), metadata={"format": "pt"})
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=SRC, help="source checkpoint (default: the shipped tiny model)")
    ap.add_argument("--dst", type=Path, default=DST, help="output folder (default: %(default)s)")
    ap.add_argument("--intermediate", type=int, default=8192,
                    help="padded moe_intermediate_size (default: %(default)s)")
    args = ap.parse_args(argv)
    dst = inflate(args.src, args.dst, args.intermediate)
    cfg = json.loads((dst / "config.json").read_text())
    per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2
    total = per_expert * cfg["num_experts"] * cfg["num_hidden_layers"]
    print(f"{dst}: {per_expert / 2**20:.2f} MiB per expert, {total / 2**20:.0f} MiB of expert weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
