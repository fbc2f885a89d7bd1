"""Overhead of ELDR expert capture, measured on real servers in one run.

Starts two ``python -m sglang_eldr.launch_server`` servers on the same model, capture on and capture
off (``--no-eldr-capture``), and alternates identical workloads between them round by round so that
background load affects both alike:

* prefill: one /generate batch of B (16) distinct random prompts of N (256) tokens, ``max_new_tokens=1`` (one
  prefill forward of B*N tokens), capture-on requests asking for ``return_eldr_counts`` (so the
  per-request reduction and wire encoding are included); throughput = prompt tokens / wall time;
* decode: the same batch with ``max_new_tokens=D``; time per output token after the first.

Also reads the signature-table and KV-pool sizes that the capture-on server reports
(``SGLANG_ELDR_STATS_FILE``) and gives the same ratio for the paper's Qwen3-30B-A3B shape.

    python bench/capture_overhead.py [--model DIR] [--rounds 7] [--out bench/results/capture_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.engine.helpers import counts_of, token_ids  # noqa: E402
from tests.engine.servers import Server  # noqa: E402
from tests.engine.tiny_model import TRAINED_DIR, build  # noqa: E402


def _batch(server: Server, prompts, max_new: int, counts: bool) -> tuple[float, list]:
    payload = {"input_ids": prompts,
               "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}}
    if counts:
        payload["return_eldr_counts"] = True
    t0 = time.perf_counter()
    status, body = server.post("/generate", payload, timeout=600)
    dt = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"{status}: {body}")
    return dt, body


def kv_ratio_for(layers, experts, top_k, kv_heads, head_dim, kv_bytes=2) -> float:
    """Signature-table bytes / KV-pool bytes per token (slot storage, uint8 ids when E <= 256)."""
    id_bytes = 1 if experts <= 256 else 2
    return (layers * top_k * id_bytes) / (layers * 2 * kv_heads * head_dim * kv_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: trained tiny MoE, else random twin)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "capture_overhead.json"))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the servers

    work = Path(tempfile.mkdtemp(prefix="eldr-overhead-"))
    if a.model:
        model = Path(a.model)
    elif (TRAINED_DIR / "config.json").exists():
        model = TRAINED_DIR
    else:
        model = build(work / "random-moe", seed=0)
    stats_file = work / "table_stats.json"
    common = ("--chunked-prefill-size", str(max(4096, a.batch * a.prompt_len)),
              "--max-total-tokens", "65536")
    on = Server(model, work / "capture-on.log", args=common,
                env={"SGLANG_ELDR_STATS_FILE": str(stats_file)})
    off = Server(model, work / "capture-off.log", args=common + ("--no-eldr-capture",))
    try:
        on.wait_ready()
        off.wait_ready()
        res = {"on": {"prefill_tok_s": [], "decode_ms_per_tok": []},
               "off": {"prefill_tok_s": [], "decode_ms_per_tok": []}}
        seed = 10_000
        for r in range(a.rounds + 1):  # round 0 warms both servers up and is not recorded
            order = [("on", on), ("off", off)] if r % 2 == 0 else [("off", off), ("on", on)]
            prompts = [token_ids(a.prompt_len, seed + i) for i in range(a.batch)]
            seed += a.batch
            for name, srv in order:  # same prompts for both, each server's cache cold for them
                srv.flush_cache()
                dt_p, body = _batch(srv, prompts, 1, counts=(name == "on"))
                if name == "on":  # sanity: every row sums to prompt_len * top_k
                    for b in body:
                        rows = counts_of(b).sum(1)
                        assert (rows == rows[0]).all() and rows[0] % a.prompt_len == 0, rows
                srv.flush_cache()
                dt_d, _ = _batch(srv, prompts, a.decode_tokens, counts=(name == "on"))
                if r == 0:
                    continue
                res[name]["prefill_tok_s"].append(a.batch * a.prompt_len / dt_p)
                res[name]["decode_ms_per_tok"].append(1000 * max(dt_d - dt_p, 0) / (a.decode_tokens - 1))
        table = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    finally:
        on.stop()
        off.stop()

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    prefill_ratio = med["on"]["prefill_tok_s"] / med["off"]["prefill_tok_s"]
    decode_ratio = med["off"]["decode_ms_per_tok"] / med["on"]["decode_ms_per_tok"]
    bytes_ratio = (table["table_bytes"] / table["kv_pool_bytes"]) if table.get("kv_pool_bytes") else None
    out = {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else "random-weights tiny Qwen3-MoE",
        "device": "cpu",
        "rounds": a.rounds, "batch": a.batch, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens,
        "prefill_tok_s": {"capture_on": med["on"]["prefill_tok_s"], "capture_off": med["off"]["prefill_tok_s"]},
        "prefill_throughput_ratio_on_over_off": prefill_ratio,
        "decode_ms_per_tok": {"capture_on": med["on"]["decode_ms_per_tok"],
                              "capture_off": med["off"]["decode_ms_per_tok"]},
        "decode_speed_ratio_on_over_off": decode_ratio,
        "per_round": res,
        "signature_table": table,
        "table_bytes_over_kv_pool_bytes": bytes_ratio,
        "table_over_kv_for_qwen3_30b_a3b_bf16": kv_ratio_for(48, 128, 8, 4, 128),
        # page storage keeps L*E/P bytes per token instead of L*k (analytic, this model's shape)
        "page_storage_over_kv": ({f"page_size_{p}": table["num_experts"] / p / (table["top_k"]) * bytes_ratio
                                  for p in (16, 64)} if bytes_ratio is not None else None),
        "targets": {"prefill_ratio_min": 0.98, "bytes_ratio_max": 0.01},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"model: {out['model']}")
    print(f"prefill throughput: capture on {med['on']['prefill_tok_s']:.0f} tok/s, off "
          f"{med['off']['prefill_tok_s']:.0f} tok/s -> ratio {prefill_ratio:.3f} (target >= 0.98)")
    print(f"decode: on {med['on']['decode_ms_per_tok']:.1f} ms/tok, off {med['off']['decode_ms_per_tok']:.1f} "
          f"ms/tok -> speed ratio {decode_ratio:.3f}")
    if bytes_ratio is not None:
        print(f"signature table {table['table_bytes']} B / KV pool {table['kv_pool_bytes']} B = "
              f"{100 * bytes_ratio:.2f}% (target <= 1%); Qwen3-30B-A3B shape: "
              f"{100 * out['table_over_kv_for_qwen3_30b_a3b_bf16']:.2f}%")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
