"""The benchmarks' --quick modes run and produce well-formed results (not their values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: int) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_router_micro_quick(tmp_path):
    out = tmp_path / "micro.json"
    text = run(["bench/router_micro.py", "--quick", "--out", str(out)], 120)
    records = json.loads(out.read_text())
    assert {r["impl"] for r in records} == {"rust", "pyo3", "numpy"}
    assert len(records) == 3 * 5 * 4
    assert all(r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] * 0.5 for r in records)
    assert "numpy/pyo3" in text


def test_simulate_quick(tmp_path):
    out = tmp_path / "sim.json"
    text = run(["bench/simulate.py", "--quick", "--out", str(out)], 300)
    data = json.loads(out.read_text())
    policies = {r["policy"] for r in data["rows"]}
    assert policies == {"eldr", "marginal", "domain", "rr", "random", "jsq", "p2c"}
    for r in data["rows"]:
        assert r["tpot_p50_ms"] > 0 and r["tpot_p99_ms"] >= r["tpot_p50_ms"]
        assert r["distinct_experts_per_layer_step"] > 0
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0 and r["prefill_servers"] >= 1
    assert out.with_suffix(".png").stat().st_size > 0
    assert "Δp50" in text
    assert data["meta"]["handoff"]["counts_s"] > 0
    assert data["meta"]["lengths"].startswith("lognormal:") and data["meta"]["refit"]["interval_s"] == 2.5
    assert all(r["rate"] > 0 and r["refits"] >= 0 for r in data["rows"])


def test_policy_seeds_quick(tmp_path):
    """Paired per-seed differences with intervals for both counts policies and the domain oracle."""
    out = tmp_path / "seeds.json"
    text = run(["bench/policy_seeds.py", "--quick", "--out", str(out)], 600)
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 1
    summary = cells[0]["summary"]
    assert {(s["policy"], s["metric"]) for s in summary} == {
        (p, m) for p in ("eldr", "marginal", "domain")
        for m in ("tpot_p50_ms", "tpot_p99_ms", "distinct_experts_per_layer_step", "ttft_p50_ms", "ttft_p99_ms")}
    for s in summary:
        assert s["n"] == 3 and s["ci95_low"] <= s["mean"] <= s["ci95_high"], s
    records = json.loads(out.read_text())["records"]
    assert {r["policy"] for r in records} == {"eldr", "marginal", "domain"}
    for r in records:
        assert r["seeds"] == 3 and r["delta_p50_pct"]["ci_low"] <= r["delta_p50_pct"]["mean"] <= r["delta_p50_pct"]["ci_high"]
        assert r["delta_ttft_p50_pct"]["ci_low"] <= r["delta_ttft_p50_pct"]["mean"] <= r["delta_ttft_p50_pct"]["ci_high"]
    # issue 11's plain list of records, beside the output
    assert json.loads(out.with_suffix(".records.json").read_text()) == records
    assert "vs" in text


@pytest.mark.skipif(sys.platform != "linux", reason="pins the server to a core")
def test_step_replay_quick(tmp_path):
    """Simulated batch compositions replayed through a real SGLang server of the tiny model."""
    out = tmp_path / "replay.json"
    text = run(["bench/step_replay.py", "--quick", "--out", str(out)], 900)
    r = json.loads(out.read_text())
    assert r["policy"] == "marginal" and r["baseline"] in ("rr", "random", "jsq", "p2c")
    assert len(r["ratios"]) == 2 and all(x > 0 for x in r["ratios"])
    assert r["ci_low"] <= r["ratio"] <= r["ci_high"] and r["predicted_ratio"] > 0
    assert all(n > 0 for reps in r["steps_per_repeat"].values() for n in reps)
    # the real engine reads experts at the replayed positions: distinct pairs seen, not only predicted
    assert all(v > 0 for v in r["distinct_pairs"].values())
    assert "predicted" in text


def test_compare_policies_quick(tmp_path):
    """Starts its own 1P+2D cluster and runs stock bench_serving through the router."""
    out = tmp_path / "compare.json"
    run(["bench/compare_policies.py", "--quick", "--out", str(out)], 900)
    data = json.loads(out.read_text())
    assert {r["policy"] for r in data["runs"]} == {"eldr", "jsq", "jsq#2"}  # jsq#2: the A/A noise floor
    for r in data["runs"]:
        assert r["completed"] > 0 and r["tpot_p50_ms"] > 0 and r["ttft_p50_ms"] > 0
        assert r["distinct_experts_per_layer_step"] is not None and r["distinct_experts_per_layer_step"] > 0
    vs = {row["policy"]: row.get("vs_jsq") for row in data["summary"]}
    assert vs["jsq"] is None and vs["eldr"]["tpot_p50_ms"][0] > 0 and vs["jsq#2"]["distinct_experts_per_layer_step"][0] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_soak_quick_loses_nothing_when_a_decoder_is_killed(tmp_path):
    """A decoder is SIGKILLed and restarted mid-run: every request gets an answer (OK or a clear
    error), none hangs, and the router's in-flight counters end at zero (soak.py exits non-zero
    otherwise)."""
    out = tmp_path / "soak.json"
    run(["bench/soak.py", "--quick", "--out", str(out)], 900)
    report = json.loads(out.read_text())
    assert report["unanswered"] == 0
    assert report["ok"] + report["errors"] == report["sent"] == 60
    assert report["ok"] >= 40
    assert all(v == 0 for v in report["in_flight_at_end"].values())
    assert any("killed" in e for e in report["events"]) and any("back" in e for e in report["events"])


def test_router_throughput_quick(tmp_path):
    """The router alone against in-process stand-in endpoints (no SGLang): every phase completes
    requests, and every routed request took the locality path (no fallback)."""
    out = tmp_path / "throughput.json"
    text = run(["bench/router_throughput.py", "--quick", "--out", str(out)], 120)
    data = json.loads(out.read_text())
    for phase in ("closed_router", "closed_direct", "open_router", "open_direct"):
        r = data[phase]
        assert r["completed"] > 0 and not r["errors"], (phase, r)
        assert r["p99_ms"] >= r["p50_ms"] > 0
    for phase in ("closed_router", "open_router"):
        assert set(data[phase]["fallbacks"]) == {"None"}, data[phase]["fallbacks"]
        assert data[phase]["router_cpu_us_per_req"] > 0
    assert set(data["added_at_rate"]) == {"p50_ms", "p99_ms"}
    assert "stand-ins" in data["note"] and "stand-ins" in text


def test_ttft_vs_stock_quick(tmp_path):
    """Two 1P+1D clusters, smg 1.13.0 in front of each and this router in front of the ELDR one;
    SGLang's client (streaming /v1/chat/completions) measures all five routes, then one interleaved
    run sends each prompt to stock-smg and eldr-router-eldr back to back. Checks the records (not
    their values), that the early route's clients got their first token from the prefill, and that
    smg was stopped."""
    out = tmp_path / "ttft.json"
    text = run(["bench/ttft_vs_stock.py", "--quick", "--out", str(out)], 900)
    records = json.loads(out.read_text())
    assert {r["route"] for r in records} == {"stock-smg", "eldr-servers-smg", "eldr-router-eldr", "eldr-router-jsq",
                                             "eldr-router-eldr-early"}
    for r in records:
        assert r["completed"] == r["num_prompts"], r
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0 and r["tpot_p50_ms"] > 0 and r["output_tok_s"] > 0
    for r in records:
        if r["route"].startswith("eldr-router-"):
            assert "counts-timeout" not in r["fallbacks"] and "counts-lost" not in r["fallbacks"], r
            early = r["route"].endswith("-early")
            assert set(r["first_token"]) <= ({"prefill", "decoder"} if early else {"off"}), r
            assert r["first_token"].get("prefill", 0) >= (r["completed"] / 2 if early else 0), r
    summary = json.loads((tmp_path / "ttft_summary.json").read_text())
    assert {s["route"] for s in summary["paired_ratios"]} == {"eldr-servers-smg", "eldr-router-eldr", "eldr-router-jsq",
                                                              "eldr-router-eldr-early"}
    assert out.with_suffix(".png").stat().st_size > 0
    assert "/ stock-smg" in text
    # The interleaved run: both routes at once, each prompt once per route as consecutive arrivals.
    inter = json.loads((tmp_path / "ttft_interleaved.json").read_text())
    routes = {"stock-smg", "eldr-router-eldr"}
    assert {r["route"] for r in inter["runs"]} == routes
    for r in inter["runs"]:
        assert r["completed"] == r["num_prompts"] == 6 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0, r
    reqs = inter["requests"]
    assert all(r["success"] for r in reqs) and len(reqs) == 12
    sent = sorted(reqs, key=lambda r: r["sent_s"])  # the order the requests actually went out
    for g in range(6):
        pair = sent[2 * g: 2 * g + 2]
        assert {r["group"] for r in pair} == {g} and {r["route"] for r in pair} == routes, pair
        assert pair[0]["prompt_tokens"] == pair[1]["prompt_tokens"] > 0, pair  # same prompt, own route tag
    cells = {(s["route"], s["vs"], s["metric"]) for s in inter["paired_ratios"]}
    assert ("eldr-router-eldr", "stock-smg", "ttft_p50_ms") in cells
    assert "counts-timeout" not in inter["router_fallbacks"] and "counts-lost" not in inter["router_fallbacks"]
    assert "interleaved rate 1" in text
    for pid in summary["smg_pids"]:  # the benchmark stopped the smg processes it started
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_measure_step_cost_quick(tmp_path):
    """Real SGLang decode steps of the tiny model: a fitted profile with an interval, the points it
    came from, and the idle check's evidence."""
    out = tmp_path / "step_cost.json"
    text = run(["bench/measure_step_cost.py", "--quick", "--out", str(out)], 600)
    data = json.loads(out.read_text())
    p = data["profiles"]["cpu-small"]
    assert p["steps"] >= 10 and {pt["tokens"] for pt in p["points"]} == {1, 4}
    assert all(pt["steps"] > 0 and pt["forward_ms_median"] > 0 for pt in p["points"])
    assert len(p["ci95"]["c"]) == 2 and p["expert_bytes"] == 3 * 128 * 64 * 2
    assert isinstance(p["idle"], bool) and p["load_before"] >= 0 and data["bandwidth_read_gb_s_1_thread"] > 0
    assert "µs/pair" in text


def test_ttft_crossover_quick(tmp_path):
    """The eldr-vs-jsq crossover: two 1P+1D clusters of this project's servers, each policy behind its
    own router, the clusters swapped between the two runs; checks the runs, the swap and the ratios."""
    out = tmp_path / "crossover.json"
    text = run(["bench/ttft_vs_stock.py", "--repeats", "0", "--decoders", "1", "--interleave", "2",
                "--interleave-routes", "eldr-router-eldr", "eldr-router-jsq", "--interleave-groups", "4",
                "--output-len", "8", "--interleave-out", str(out), "--out", str(tmp_path / "unused.json")], 900)
    inter = json.loads(out.read_text())
    runs = inter["runs"]
    assert sorted((r["repeat"], r["route"]) for r in runs) == [
        (0, "eldr-router-eldr"), (0, "eldr-router-jsq"), (1, "eldr-router-eldr"), (1, "eldr-router-jsq")]
    cluster = {(r["repeat"], r["route"]): r["cluster"] for r in runs}
    assert cluster[(0, "eldr-router-eldr")] == cluster[(1, "eldr-router-jsq")] != cluster[(0, "eldr-router-jsq")]
    assert cluster[(1, "eldr-router-eldr")] == cluster[(0, "eldr-router-jsq")]
    for r in runs:
        assert r["completed"] == r["num_prompts"] == 4 and r["tpot_p50_ms"] > 0, r
    assert len(inter["requests"]) == 16 and all(r["success"] for r in inter["requests"])
    cells = {(s["route"], s["vs"], s["metric"]) for s in inter["paired_ratios"]}
    assert ("eldr-router-eldr", "eldr-router-jsq", "tpot_p50_ms") in cells
    assert "counts-timeout" not in inter["router_fallbacks"] and "counts-lost" not in inter["router_fallbacks"]
    assert "eldr-router-eldr (cluster 1)" in text and not inter["smg_pids"]
