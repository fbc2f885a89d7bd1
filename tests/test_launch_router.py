"""The router process refuses to start on a bad centroid file or configuration, and says why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_eldr import launch_router

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tiny-qwen3-moe" / "eldr-centroids-2d.eldr"


def launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sglang_eldr.launch_router", "--port", "1", "--prefill", "http://127.0.0.1:9"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "not a readable centroid file|corrupt"),
    (lambda b: b[:-9] + bytes([b[-9] ^ 0xFF]) + b[-8:], "checksum mismatch|corrupt|not a readable"),
    (lambda b: b"not a centroid file", "not a readable"),
])
def test_corrupt_centroid_file_refuses_to_start(tmp_path, damage, message):
    bad = tmp_path / "bad.eldr"
    bad.write_bytes(damage(SHIPPED.read_bytes()))
    r = launch("--decode", "http://127.0.0.1:10", "--decode", "http://127.0.0.1:11", "--centroids", str(bad))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("launch_router: ") and re.search(message, r.stderr), r.stderr


def test_mismatched_or_missing_centroids_refuse_to_start(tmp_path):
    r = launch(*sum((["--decode", f"http://127.0.0.1:{p}"] for p in (10, 11, 12)), []), "--policy", "eldr",
               "--centroids", str(SHIPPED))
    assert r.returncode == 2 and "2 centroids but 3 decoders" in r.stderr, r.stderr
    r = launch("--decode", "http://127.0.0.1:10", "--policy", "eldr", "--centroids", str(tmp_path / "missing.eldr"))
    assert r.returncode == 2 and "cannot read" in r.stderr, r.stderr


def test_eldr_without_centroids_starts_least_loaded():
    args = launch_router.build_parser().parse_args(
        ["--prefill", "http://127.0.0.1:9", "--decode", "http://127.0.0.1:10", "--policy", "eldr"])
    lb = launch_router.build_balancer(args)
    assert lb.decode.routing == "least-loaded (no centroids)" and lb.decode.num_decoders == 1
    assert "POST /centroids" in launch_router.build_parser().format_help()


def test_prefill_spec_counts_endpoint_forms():
    w = launch_router.parse_prefill(["http://10.0.0.7:30000", "8998"])
    assert (w.bootstrap_port, w.counts_port, w.counts_host) == (8998, None, None)  # asked from the prefill
    w = launch_router.parse_prefill(["http://10.0.0.7:30000", "8998", "9100"])
    assert w.counts_endpoint == "tcp://10.0.0.7:9100"
    w = launch_router.parse_prefill(["http://10.0.0.7:30000", "8998", "10.0.1.7:9100"])
    assert w.counts_endpoint == "tcp://10.0.1.7:9100"
    w = launch_router.parse_prefill(["http://[fd00::7]:30000", "8998", "9100"])
    assert w.counts_endpoint == "tcp://[fd00::7]:9100"
    for bad in (["http://h:1", "8998", "x"], ["http://h:1", "8998", ":9"], ["http://h:1", "8998", "h:70000"]):
        with pytest.raises(ValueError, match="counts endpoint"):
            launch_router.parse_prefill(bad)


def test_refit_off_is_eldr_static():
    base = ["--prefill", "http://127.0.0.2:9", "--decode", "http://127.0.0.2:10", "--decode", "http://127.0.0.2:11",
            "--centroids", str(SHIPPED)]
    online = launch_router.build_balancer(launch_router.build_parser().parse_args(base + ["--policy", "eldr"]))
    off = launch_router.build_balancer(launch_router.build_parser().parse_args(base + ["--policy", "eldr", "--refit", "off"]))
    static = launch_router.build_balancer(launch_router.build_parser().parse_args(base + ["--policy", "eldr-static"]))
    assert online.decode.refitter is not None and online.decode.refitter.periodic and online.decode.online_refit
    # Without the periodic refit, membership changes still refit.
    for chooser in (off.decode, static.decode):
        assert chooser.refitter is not None and not chooser.refitter.periodic and not chooser.online_refit
    with pytest.raises(ValueError, match="eldr-static is eldr"):
        launch_router.build_balancer(launch_router.build_parser().parse_args(
            base + ["--policy", "eldr-static", "--refit", "online"]))
    r = launch("--decode", "http://127.0.0.1:10", "--decode", "http://127.0.0.1:11", "--centroids", str(SHIPPED),
               "--policy", "eldr-static", "--refit", "online")
    assert r.returncode == 2 and "eldr-static is eldr" in r.stderr


def test_policies_without_centroids_refuse_a_centroid_file_and_bad_step_costs():
    two = ["--decode", "http://127.0.0.1:10", "--decode", "http://127.0.0.1:11"]
    for policy in ("marginal", "jsq"):
        r = launch(*two, "--policy", policy, "--centroids", str(SHIPPED))
        assert r.returncode == 2 and "takes no centroids" in r.stderr, r.stderr
    for bad in ("1,2", "a,b,c", "-1,0,1", "0,0,0", "nan,0,1"):
        r = launch(*two, "--policy", "marginal", "--step-cost", bad)
        assert r.returncode == 2 and "--step-cost" in r.stderr, (bad, r.stderr)
    r = launch(*two, "--policy", "marginal", "--refit", "off")
    assert r.returncode == 2 and "--refit is for the eldr policy" in r.stderr, r.stderr
    args = launch_router.build_parser().parse_args(
        ["--prefill", "http://127.0.0.1:9", *two, "--policy", "marginal", "--step-cost", "0.007,0.0008,0.0015"])
    lb = launch_router.build_balancer(args)
    assert lb.decode.routing == "expected experts"
    assert lb.decode.router.step_cost == (0.007, 0.0008, 0.0015) and lb.decode.router.geometry is None
    assert lb.decode.router.batch_cap is None and lb.decode.router.sharpness == 2.0
    # The marginal policy's own options: a value taken, an out-of-range one refused, and refused on jsq.
    for flag, good, attr, value, bad, refusal, on_jsq in [
            ("--batch-cap", "16", "batch_cap", 16, "0", "batch_cap", "4"),
            ("--sharpness", "1", "sharpness", 1.0, "20", "sharpness: must be in [0.125, 8]", "2")]:
        taken = launch_router.build_balancer(launch_router.build_parser().parse_args(
            ["--prefill", "http://127.0.0.1:9", *two, "--policy", "marginal", flag, good]))
        assert getattr(taken.decode.router, attr) == value
        r = launch(*two, "--policy", "marginal", flag, bad)
        assert r.returncode == 2 and refusal in r.stderr, r.stderr
        r = launch(*two, "--policy", "jsq", flag, on_jsq)
        assert r.returncode == 2 and f"{flag} is for the marginal policy" in r.stderr, r.stderr
