"""Overhead of ELDR expert capture (SGLang's routed-experts capturer + the counts reduction), measured
on real servers in one run.

Starts two ``python -m sglang_eldr.launch_server`` servers on the same model, capture on (SGLang's
``--enable-return-routed-experts``, which the launcher sets) and capture off (``--no-eldr-capture``),
and alternates identical workloads between them round by round so that background load affects both
alike:

* prefill: one /generate batch of B (8) distinct random prompts of N (480: the tiny model's context is 512) tokens, ``max_new_tokens=1``
  (one prefill forward of B*N tokens), capture-on requests asking for ``return_eldr_counts`` (so the
  per-request reduction and wire encoding are included); throughput = prompt tokens / wall time;
* decode: the same batch with ``max_new_tokens=D``; time per output token after the first (what a
  decode server pays when it is started with ``--eldr-capture``; decoders capture only when asked).

The capture-on server times its own counts reduction per batch, in process (``SGLANG_ELDR_STATS_FILE``),
and reports the size of SGLang's host cache of routed experts; the reduction is set against the fastest
capture-off prefill of the same batch (target: <= 1 %).

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: trained tiny MoE, else random twin)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=480)  # + decode tokens within the 512 context
    ap.add_argument("--decode-tokens", type=int, default=24)
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
    stats_file = work / "capture_stats.json"
    common = ("--chunked-prefill-size", str(max(4096, a.batch * a.prompt_len)),
              "--max-total-tokens", "65536")
    on = Server(model, work / "capture-on.log", args=common,
                env={"SGLANG_ELDR_STATS_FILE": str(stats_file)})
    off = Server(model, work / "capture-off.log", args=common + ("--no-eldr-capture",))
    try:
        on.wait_ready()
        off.wait_ready()
        res: dict[str, dict[str, list[float]]] = {"on": {"prefill_tok_s": [], "decode_ms_per_tok": []},
                                                  "off": {"prefill_tok_s": [], "decode_ms_per_tok": []}}
        reduce_ms: list[float] = []
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
                if name == "on" and r > 0:  # the reduction of the batch just served, timed in the server
                    reduce_ms.append(float(json.loads(stats_file.read_text())["reduce_ms_per_batch"][-1]))
                srv.flush_cache()
                dt_d, _ = _batch(srv, prompts, a.decode_tokens, counts=(name == "on"))
                if r == 0:
                    continue
                res[name]["prefill_tok_s"].append(a.batch * a.prompt_len / dt_p)
                res[name]["decode_ms_per_tok"].append(1000 * max(dt_d - dt_p, 0) / (a.decode_tokens - 1))
        stats = json.loads(stats_file.read_text())
    finally:
        on.stop()
        off.stop()

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    prefill_ratio = med["on"]["prefill_tok_s"] / med["off"]["prefill_tok_s"]
    paired = [a_ / b_ for a_, b_ in zip(res["on"]["prefill_tok_s"], res["off"]["prefill_tok_s"])]
    best_off_ms = 1000 * a.batch * a.prompt_len / max(res["off"]["prefill_tok_s"])
    reduce_med = statistics.median(reduce_ms)
    decode_ratio = med["off"]["decode_ms_per_tok"] / med["on"]["decode_ms_per_tok"]
    out = {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else "random-weights tiny Qwen3-MoE",
        "device": "cpu",
        "capture": "SGLang routed-experts capturer (--enable-return-routed-experts) + ELDR counts reduction",
        "rounds": a.rounds, "batch": a.batch, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens,
        "prefill_tok_s": {"capture_on": med["on"]["prefill_tok_s"], "capture_off": med["off"]["prefill_tok_s"]},
        "prefill_throughput_ratio_on_over_off": prefill_ratio,
        "prefill_ratio_paired_per_round": paired,
        "prefill_ratio_paired_median": statistics.median(paired),
        "reduction_ms_per_batch_in_server": reduce_ms,
        "reduction_ms_per_batch_median": reduce_med,
        "fastest_capture_off_prefill_ms": best_off_ms,
        "reduction_share_of_prefill": reduce_med / best_off_ms,
        "load_average_at_end": os.getloadavg(),
        "decode_ms_per_tok": {"capture_on": med["on"]["decode_ms_per_tok"],
                              "capture_off": med["off"]["decode_ms_per_tok"]},
        "decode_speed_ratio_on_over_off": decode_ratio,
        "per_round": res,
        "host_cache_shape": stats.get("host_cache_shape"),
        "host_cache_bytes": stats.get("host_cache_bytes"),
        "targets": {"reduction_share_of_prefill_max": 0.01},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"model: {out['model']}")
    print(f"prefill throughput: capture on {med['on']['prefill_tok_s']:.0f} tok/s, off "
          f"{med['off']['prefill_tok_s']:.0f} tok/s -> ratio {prefill_ratio:.3f} (target >= 0.98)")
    print(f"paired per-round ratios: {', '.join(f'{x:.3f}' for x in paired)} (median "
          f"{statistics.median(paired):.3f}); load average {os.getloadavg()[0]:.1f}")
    print(f"counts reduction in the server: median {reduce_med:.2f} ms per {a.batch}x{a.prompt_len} batch vs "
          f"fastest capture-off prefill {best_off_ms:.0f} ms -> {100 * reduce_med / best_off_ms:.2f}% (target <= 1%)")
    print(f"decode: on {med['on']['decode_ms_per_tok']:.1f} ms/tok, off {med['off']['decode_ms_per_tok']:.1f} "
          f"ms/tok -> speed ratio {decode_ratio:.3f}")
    print(f"SGLang's routed-experts host cache: {stats.get('host_cache_shape')} int32 = "
          f"{stats.get('host_cache_bytes', 0) / 2**20:.1f} MiB (host memory)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
