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


def capture_ops_ms(table_stats: dict, batch: int, prompt_len: int, reps: int = 50) -> dict:
    """Time the plugin's own work for one prefill batch in this process, on tensors shaped like the
    server's: the per-layer table writes of a forward of batch*prompt_len tokens, and the counts reduction
    + wire encoding of its batch requests. Independent of other load on the machine."""
    import torch

    from sglang_eldr.engine.counts_wire import encode_counts
    from sglang_eldr.engine.moe_shape import MoeShape
    from sglang_eldr.engine.signature_cache import SignatureTable

    torch.set_num_threads(1)
    L, E, K = table_stats["num_layers"], table_stats["num_experts"], table_stats["top_k"]
    t = SignatureTable(MoeShape(L, E, K), table_stats["kv_slots"], "cpu")
    n = batch * prompt_len
    loc = torch.randperm(table_stats["kv_slots"] - 1)[:n] + 1
    ids = [torch.randint(0, E, (n, K)) for _ in range(L)]
    slots = [loc[i * prompt_len:(i + 1) * prompt_len] for i in range(batch)]
    t0 = time.perf_counter()
    for _ in range(reps):
        lo = t.begin_forward(loc)
        for layer in range(L):
            t.write(layer, lo, ids[layer])
        t.end_forward()
    write_ms = (time.perf_counter() - t0) * 1000 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        for c in t.counts(slots).numpy():
            encode_counts(c)
    reduce_ms = (time.perf_counter() - t0) * 1000 / reps
    return {"write_ms_per_forward": write_ms, "reduce_and_encode_ms_per_batch": reduce_ms,
            "total_ms": write_ms + reduce_ms}


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
    paired = [a_ / b_ for a_, b_ in zip(res["on"]["prefill_tok_s"], res["off"]["prefill_tok_s"])]
    ops = capture_ops_ms(table, a.batch, a.prompt_len) if table else None
    best_off_ms = 1000 * a.batch * a.prompt_len / max(res["off"]["prefill_tok_s"])
    ops_ratio = best_off_ms / (best_off_ms + ops["total_ms"]) if ops else None
    decode_ratio = med["off"]["decode_ms_per_tok"] / med["on"]["decode_ms_per_tok"]
    bytes_ratio = (table["table_bytes"] / table["kv_pool_bytes"]) if table.get("kv_pool_bytes") else None
    out = {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else "random-weights tiny Qwen3-MoE",
        "device": "cpu",
        "rounds": a.rounds, "batch": a.batch, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens,
        "prefill_tok_s": {"capture_on": med["on"]["prefill_tok_s"], "capture_off": med["off"]["prefill_tok_s"]},
        "prefill_throughput_ratio_on_over_off": prefill_ratio,
        "prefill_ratio_paired_per_round": paired,
        "prefill_ratio_paired_median": statistics.median(paired),
        "capture_ops_in_process": ops,
        "fastest_capture_off_prefill_ms": best_off_ms,
        "prefill_ratio_from_ops": ops_ratio,
        "load_average_at_end": os.getloadavg(),
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
    print(f"paired per-round ratios: {', '.join(f'{x:.3f}' for x in paired)} (median "
          f"{statistics.median(paired):.3f}); load average {os.getloadavg()[0]:.1f}")
    if ops:
        print(f"plugin work per {a.batch}x{a.prompt_len} prefill batch, in process: writes "
              f"{ops['write_ms_per_forward']:.2f} ms + reduce/encode {ops['reduce_and_encode_ms_per_batch']:.2f} ms"
              f" vs fastest capture-off prefill {best_off_ms:.0f} ms -> ratio {ops_ratio:.4f}")
    print(f"decode: on {med['on']['decode_ms_per_tok']:.1f} ms/tok, off {med['off']['decode_ms_per_tok']:.1f} "
          f"ms/tok -> speed ratio {decode_ratio:.3f}")
    if bytes_ratio is not None:
        print(f"signature table {table['table_bytes']} B / KV pool {table['kv_pool_bytes']} B = "
              f"{100 * bytes_ratio:.2f}% (target <= 1%); Qwen3-30B-A3B shape: "
              f"{100 * out['table_over_kv_for_qwen3_30b_a3b_bf16']:.2f}%")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
